"""The HTML plan report: heatmaps with pattern outlines, the page's content, and a smoke
test in a real headless browser (Debian's chromium, installed by scripts/setup.sh)."""
import base64
import html.parser
import io
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
import torch

import sparsec
from sparsec.ir.budget import Budget
from sparsec.tools.cli import main
from sparsec.passes.infra.pass_manager import PassResult
from sparsec.passes.calibrate import Calibrate
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.fuse_heads import FuseHeads
from sparsec.passes.lower import Lower
from sparsec.passes.search import Search
from sparsec.patterns import get_pattern
from sparsec.ir.plan import AttentionSite, FuseRecord, HeadPlan, Plan
from sparsec.tools.report import block_maps, render_report, write_report
from sparsec.tools.report.figures import HEATMAP_PIXELS, MAX_CELLS, OUTLINE_RGB, head_heatmap
from sparsec.ir.targets import Target, register_target
from sparsec.testing import planted_llama, planted_llama_inputs


# Small blocks so a short calibration length still gives a grid worth drawing.
TINY_BLOCKS = register_target(Target("report-test", "cpu", "cpu", peak_tflops=0.2, bandwidth_gbs=20.0,
                                      launch_overhead_us=5.0, block_m=8, block_n=8))


class _Tags(html.parser.HTMLParser):
    """Every start tag of a page, as (tag, attributes)."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def with_class(self, name):
        return [attrs for _tag, attrs in self.tags if name in (attrs.get("class") or "").split()]


def _decode(data_uri):
    assert data_uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(data_uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(raw), format="png")[..., :3]


# -- heatmaps --

@pytest.mark.parametrize("kind,params,causal", [("window", {"window": [10, 0]}, True),
                                                 ("sink_window", {"sink": [3, 0], "window": [6, 0]}, False)])
def test_heatmap_outlines_exactly_the_pattern_blocks(kind, params, causal):
    torch.manual_seed(0)
    n, block = 37, 4                                 # 10 x 10 blocks, the last one partial
    layout = get_pattern(kind).block_layout(params, n, n, causal, block, block)
    mass = torch.rand(layout.shape, dtype=torch.float64) + 0.01
    if causal:
        mass = mass.tril()
    image = _decode(head_heatmap(mass, layout))
    scale = HEATMAP_PIXELS // layout.shape[0]
    assert image.shape[:2] == (layout.shape[0] * scale, layout.shape[1] * scale)
    red = np.all(np.abs(image - np.array(OUTLINE_RGB)) < 0.02, axis=-1)
    kept = np.pad(layout.numpy(), 1)
    interior = kept[:-2, 1:-1] & kept[2:, 1:-1] & kept[1:-1, :-2] & kept[1:-1, 2:]
    border = layout.numpy() & ~interior
    drawn = red.reshape(layout.shape[0], scale, layout.shape[1], scale).any(axis=(1, 3))
    assert (drawn == border).all()
    assert border.sum() >= 4
    # No mass (above the causal diagonal): light grey; the head's largest block: viridis' top colour.
    cell = lambda qb, kb: image[qb * scale + scale // 2, kb * scale + scale // 2]  # noqa: E731
    if causal:
        np.testing.assert_allclose(cell(0, 9), [0.93] * 3, atol=0.01)
    qb, kb = np.unravel_index(int(mass.argmax()), tuple(mass.shape))
    np.testing.assert_allclose(cell(qb, kb), matplotlib.colormaps["viridis"](1.0)[:3], atol=0.02)


def test_heatmap_of_a_long_grid_is_pooled():
    layout = torch.ones(257, 257, dtype=torch.bool).tril()     # e.g. N = 16k on 64-token blocks
    image = _decode(head_heatmap(torch.rand(layout.shape).tril(), layout))
    assert max(image.shape[:2]) <= MAX_CELLS


def test_block_maps_reads_stats_profiles_and_tensors():
    mass = torch.rand(2, 3, 5)
    maps = block_maps(mass, 8, 16)
    assert (maps.n_q, maps.n_k, maps.block_m, maps.block_n) == (24, 80, 8, 16)

    class Profile:
        def __init__(self, n, block):
            self.n_q, self.n_k, self.block = n, n, block
            self.block_mass = torch.rand(2, -(-n // block), -(-n // block))

    class Stats:
        profiles = {(20, 20): Profile(20, 4), (40, 40): Profile(40, 4), (30, 30): Profile(30, 4)}

    maps = block_maps(Stats(), 64, 64)          # the longest calibration length is drawn
    assert (maps.n_q, maps.block_m, maps.grid) == (40, 4, (10, 10))
    assert maps.mass is Stats.profiles[(40, 40)].block_mass


# -- the page --

class _KeepStats:
    """Keeps calibrate's statistics (``compile`` does not return them yet)."""

    name = "keep_stats"

    def run(self, gm, ctx):
        self.stats = ctx.attention_stats
        return PassResult(gm, False, {})


# The example model, small: layer 0 head 0 is a planted 8-token window, head 1 a sink + window.
PLANT = {0: {0: ("window", 8), 1: ("sink_window", 8)}, 1: {2: ("window", 16)}}
LENGTH = 96                                          # 12 x 12 blocks of 8


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A small planted Llama calibrated at N=96 on 8x8 blocks, searched with costs at N=8192
    (two recall levels, to stay quick), heads fused; its statistics, dump and report."""
    model = planted_llama(layers=2, heads=4, kv_heads=2, hidden=128, intermediate=128, vocab=64, plant=PLANT)
    batches = [(planted_llama_inputs(2, LENGTH, vocab=64, seed=seed),) for seed in range(2)]
    keep = _KeepStats()
    budget = Budget(max_error=0.3, seq_len=8192, recall_levels=(0.95, 0.8))
    directory = tmp_path_factory.mktemp("report")
    cm = sparsec.compile(model, batches[0], calibration=batches, target=TINY_BLOCKS,
                         passes=[Canonicalize(), Calibrate(), Search(budget), FuseHeads(), keep, Lower()],
                         dump_dir=directory / "dump")
    path = write_report(cm.plan, keep.stats, directory / "sub" / "report.html")
    return cm, keep.stats, path


def test_report_shows_every_head_of_the_plan(compiled):
    cm, stats, path = compiled
    text = path.read_text()
    tags = _Tags(text)
    cells = tags.with_class("head-cell")
    heads = [(site.layer, head) for site in cm.plan.attention for head in site.heads]
    assert len(cells) == len(heads) == 8
    for attrs, (layer, head) in zip(cells, heads):
        assert (int(attrs["data-layer"]), int(attrs["data-head"]), attrs["data-pattern"]) == \
            (layer, head.head, head.pattern)
    assert len(tags.with_class("layer")) == len(cm.plan.attention) == 2
    assert text.count(f"N={LENGTH}, 8x8 blocks") == 2    # the calibration length and tiles
    images = [attrs["src"] for tag, attrs in tags.tags if tag == "img"]
    assert len(images) == 8 + 2                      # heads + one sensitivity curve per layer
    for src in images:
        _decode(src)
    # Self-contained: nothing fetched from anywhere.
    assert not [a for _t, a in tags.tags for key in ("src", "href") if key in a and not a[key].startswith("data:")]
    assert "http" not in text.replace("http-equiv", "")
    search = cm.plan.search
    assert f"{search.predicted_speedup:.2f}x (cost model, attention at N=8192)" in text
    assert f"measured {search.measured_error:.4g} on 1 held-out batches" in text
    assert f"{cm.plan.error['rel_l2_vs_dense_on_example']:.4g}" in text
    sparse = sum(head.pattern != "dense" for _layer, head in heads)
    assert f"sparse heads</td><td>{sparse} / 8" in text
    for site in cm.plan.attention:
        assert f"chosen level {site.search.chosen_level}" in text
        launches = len(site.groups)
        assert f"fused groups ({launches} launch{'es' if launches != 1 else ''})" in text
    assert "No sensitivity curve" not in text


def test_inspect_explains_a_searched_head(compiled, capsys):
    cm, _stats, path = compiled
    site = cm.plan.attention[1]
    head = site.heads[0]
    assert main(["inspect", str(path.parent.parent / "dump"), "--head", "1.0"]) == 0
    out = capsys.readouterr().out
    assert f"chosen: {head.pattern}" in out and "recall threshold: 0.95" in out
    assert f"the layer took level {site.search.chosen_level}" in out
    ladder = [line for line in out.splitlines() if line[4:9].strip() in ("1", "2")]
    assert [line.split()[1 if line.startswith("  *") else 0] for line in ladder] == ["1", "2"]
    assert sum(line.startswith("  *") for line in ladder) == (head.pattern != "dense")
    assert f"why: the layerwise search picked it ({head.reason})" in out


def test_dumped_compile_and_compiled_model_write_the_report(tmp_path):
    model = planted_llama(layers=1, heads=4, kv_heads=2, hidden=128, intermediate=128, vocab=64,
                          plant={0: {0: ("window", 8)}})
    cm = sparsec.compile(model, (planted_llama_inputs(2, LENGTH, vocab=64),), target=TINY_BLOCKS,
                         dump_dir=tmp_path / "dump")
    for path in (tmp_path / "dump" / "report.html", cm.report(tmp_path / "report.html")):
        text = path.read_text()
        assert len(_Tags(text).with_class("head-cell")) == 4
        assert f"calibration attention at N={LENGTH}, 8x8 blocks" in text


def _first_image(page):
    return _decode(next(attrs["src"] for tag, attrs in _Tags(page).tags if tag == "img"))


def _colours(image):
    return len(np.unique(image.reshape(-1, 3).round(3), axis=0))


def _viridis_position(rgb):
    """Where on viridis (0 darkest .. 1 brightest) a colour lies."""
    scale = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    return float(np.abs(scale - rgb).sum(axis=1).argmin()) / 255


def test_heatmaps_show_the_calibration_maps(compiled):
    cm, stats, _path = compiled
    site = cm.plan.attention[0]
    assert stats[site.name].profiles[(LENGTH, LENGTH)].block_mass.shape[-2:] == (12, 12)
    with_stats, without = render_report(cm.plan, stats), render_report(cm.plan, None)
    assert "no calibration maps: pattern masks at N=1024" in without
    # The model's head 0 of layer 0 (the planted 8-token window), wherever fuse_heads put it.
    cell = next(h for h in range(4) if site.head_permutation()[h] == 0)
    image = _decode([attrs["src"] for tag, attrs in _Tags(with_stats).tags if tag == "img"][cell])
    scale = HEATMAP_PIXELS // 12
    assert image.shape[:2] == (12 * scale,) * 2
    centre = lambda qb, kb: image[qb * scale + scale // 2, kb * scale + scale // 2]  # noqa: E731
    assert min(_viridis_position(centre(b, b)) for b in range(12)) > 0.8        # the band is bright
    assert max(_viridis_position(centre(b, 0)) for b in range(3, 12)) < 0.5     # far keys are dark
    np.testing.assert_allclose(centre(0, 11), [0.93] * 3, atol=0.01)             # above the diagonal: none
    assert _colours(_first_image(without)) <= 3      # without maps: kept, skipped, outline


def test_report_of_a_hand_made_plan(tmp_path):
    """No search, a target this process does not know, a dynamic pattern, bare tensor maps and
    heads reordered by fuse_heads (the maps keep the model's head order)."""
    heads = [HeadPlan(0, "vertical_slash", {"vertical": [4, 0], "slash": [4, 0], "queries": 8}, 0.97, 0.3),
             HeadPlan(1)]
    swapped = FuseRecord(strategy="weights", reason="", head_permutation=[1, 0], kv_head_permutation=[1, 0],
                         launches_before=2, launches_after=2, groups_split_by_gqa=0, gqa_split=None,
                         permuted_parameters={}, merges=[])
    reordered = AttentionSite("layers.0", 0, 2, 2, 8, True, heads, fusion=swapped)
    plain = AttentionSite("layers.1", 1, 2, 2, 8, False, [HeadPlan(0, "window", {"window": [0, 0.1]}, 0.99, 0.2),
                                                          HeadPlan(1)])
    plan = Plan(target="custom-target-not-registered-here", attention=[reordered, plain])
    one_block = torch.zeros(4, 4)
    one_block[0, 0] = 1.0
    maps = torch.stack([one_block, torch.ones(4, 4).tril()])     # model heads 0 and 1
    text = write_report(plan, {"layers.0": maps}, tmp_path / "r.html").read_text()
    tags = _Tags(text)
    assert len(tags.with_class("head-cell")) == 4 and len(tags.with_class("dense")) == 2
    assert "L0.H0 (model head 1)" in text and "L0.H1 (model head 0)" in text
    assert "dynamic: mask estimated per input" in text and text.count("No sensitivity curve") == 2
    assert "N=256, 64x64 blocks" in text and "no calibration maps: pattern masks at N=1024" in text
    # Site head 0 shows model head 1's map: every block below the diagonal has mass.
    image = _first_image(text)
    scale = HEATMAP_PIXELS // 4
    np.testing.assert_allclose(image[3 * scale + scale // 2, scale // 2],
                               matplotlib.colormaps["viridis"](1.0)[:3], atol=0.02)
    assert "attention FLOPs from head densities" in text


# -- in a real browser --

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected before the page: records console errors, uncaught exceptions and failed loads,
# and how many images decoded, into <body data-probe-*> for --dump-dom to show.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(e.message ||
  'failed to load ' + (e.target.src || e.target.href || e.target.tagName).slice(0, 60)), true);
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(' ')); consoleError(...args); };
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.probeErrors = window.__errors.length;
  document.body.dataset.probeImages = images.length;
  document.body.dataset.probeBroken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.probeMessages = window.__errors.join(' | ');
});
</script>"""


def _load_in_browser(page, tmp_path):
    """Load ``page`` (HTML text) in headless chromium; the rendered DOM's tags and its stderr."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return _Tags(done.stdout), done.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_report_loads_in_a_browser_without_errors(compiled, tmp_path):
    cm, _stats, path = compiled
    dom, stderr = _load_in_browser(path.read_text(), tmp_path)
    body = next(attrs for tag, attrs in dom.tags if tag == "body")
    assert body["data-probe-errors"] == "0", body["data-probe-messages"]
    assert "Uncaught" not in stderr
    assert int(body["data-probe-images"]) == 10 and body["data-probe-broken"] == "0"
    assert len(dom.with_class("head-cell")) == sum(len(site.heads) for site in cm.plan.attention)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_browser_probe_catches_errors(tmp_path):
    broken = ('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
              '<script>notDefined()</script></body></html>')
    dom, _stderr = _load_in_browser(broken, tmp_path)
    body = next(attrs for tag, attrs in dom.tags if tag == "body")
    assert body["data-probe-errors"] == "2" and body["data-probe-broken"] == "1"
    assert "notDefined" in body["data-probe-messages"]
