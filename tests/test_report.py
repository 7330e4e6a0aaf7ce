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
from sparsec.pass_manager import PassResult
from sparsec.passes.calibrate import Calibrate
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.lower import Lower
from sparsec.patterns import get_pattern
from sparsec.plan import AttentionSite, HeadPlan, Plan
from sparsec.report import block_maps, render_report, write_report
from sparsec.report.figures import HEATMAP_PIXELS, MAX_CELLS, OUTLINE_RGB, head_heatmap
from sparsec.targets import Target, register_target

from models import build_llama_gqa, llama_inputs

# Small blocks so a short calibration length still gives a grid worth drawing.
TINY_BLOCKS = register_target(Target("report-test", "cpu", "cpu", peak_tflops=0.2, bandwidth_gbs=20.0,
                                      launch_overhead_us=5.0, block_m=8, block_n=8))
HEAD_PATTERNS = [("window", {"window": [6, 0]}), ("sink_window", {"sink": [2, 0], "window": [8, 0]}),
                 ("dense", {}), ("vertical_slash", {"vertical": [4, 0], "slash": [4, 0], "last_q": 8})]


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

class _PlantAndKeepStats:
    """A stand-in for classification: fixed head patterns; keeps calibrate's statistics."""

    name = "plant_patterns"

    def __init__(self):
        self.stats = None

    def run(self, gm, ctx):
        for site in ctx.plan.attention:
            for head, (kind, params) in zip(site.heads, HEAD_PATTERNS):
                head.pattern, head.params = kind, params
                head.density = get_pattern(kind).density(params, 64, site.causal) if kind != "vertical_slash" else 0.3
                head.recall = 0.97
            site.groups = site.group_heads_by_pattern()
        self.stats = ctx.attention_stats
        return PassResult(gm, False, {})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The tiny GQA Llama compiled at N=64 on 8x8 blocks, its statistics and its report."""
    model, example = build_llama_gqa(batch=2, seq=64)
    plant = _PlantAndKeepStats()
    cm = sparsec.compile(model, example, calibration=[llama_inputs(2, 64), llama_inputs(1, 48)],
                         target=TINY_BLOCKS, passes=[Canonicalize(), Calibrate(), plant, Lower()])
    cm.plan.attention[1].extra["sensitivity"] = {"levels": [0.0, 0.5, 0.9], "errors": [0.0, 0.004, 0.05],
                                                 "chosen": 0.5, "metric": "rel_l2"}
    path = write_report(cm.plan, plant.stats, tmp_path_factory.mktemp("report") / "sub" / "report.html")
    return cm, plant.stats, path


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
    assert len(tags.with_class("layer")) == len(cm.plan.attention)
    assert "N=64, 8x8 blocks" in text                # the longest calibration length
    assert "causal mask" in text                     # HF's causal mask, recognised by calibrate
    images = [attrs["src"] for tag, attrs in tags.tags if tag == "img"]
    assert len(images) == 8 + 1                      # heads + one sensitivity curve
    for src in images:
        _decode(src)
    # Self-contained: nothing fetched from anywhere.
    assert not [a for _t, a in tags.tags for key in ("src", "href") if key in a and not a[key].startswith("data:")]
    assert "http" not in text.replace("http-equiv", "")
    error = cm.plan.error["rel_l2_vs_dense_on_example"]
    assert f"{error:.4g}" in text and "sparse heads</td><td>6 / 8" in text
    assert text.count("No sensitivity curve") == 1 and "chosen level 0.5" in text
    assert "dynamic: mask estimated per input" in text
    assert text.count("fused groups (4 launches)") == 2


def _first_image(page):
    return _decode(next(attrs["src"] for tag, attrs in _Tags(page).tags if tag == "img"))


def test_heatmaps_show_the_calibration_maps(compiled):
    cm, stats, _path = compiled
    profile = stats[cm.plan.attention[0].name].profiles[(64, 64)]
    assert profile.block_mass.shape[-2:] == (8, 8)
    with_stats, without = render_report(cm.plan, stats), render_report(cm.plan, None)
    assert "no calibration maps: pattern masks at N=1024" in without
    assert _first_image(with_stats).shape[:2] == (8 * (HEATMAP_PIXELS // 8),) * 2
    colours = lambda image: len(np.unique(image.reshape(-1, 3).round(3), axis=0))  # noqa: E731
    assert colours(_first_image(with_stats)) > 8 and colours(_first_image(without)) <= 3   # kept, skipped, outline


def test_report_without_stats_or_search(tmp_path):
    sites = [AttentionSite(f"layers.{i}", i, 2, 2, 8, False,
                           [HeadPlan(0, "window", {"window": [0, 0.1]}, 0.99, 0.2), HeadPlan(1)])
             for i in range(3)]
    plan = Plan(target="custom-target-not-registered-here", attention=sites)
    tags = _Tags(write_report(plan, {}, tmp_path / "r.html").read_text())
    assert len(tags.with_class("head-cell")) == 6 and len(tags.with_class("dense")) == 3


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
    assert int(body["data-probe-images"]) == 9 and body["data-probe-broken"] == "0"
    assert len(dom.with_class("head-cell")) == sum(len(site.heads) for site in cm.plan.attention)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_browser_probe_catches_errors(tmp_path):
    broken = ('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
              '<script>notDefined()</script></body></html>')
    dom, _stderr = _load_in_browser(broken, tmp_path)
    body = next(attrs for tag, attrs in dom.tags if tag == "body")
    assert body["data-probe-errors"] == "2" and body["data-probe-broken"] == "1"
    assert "notDefined" in body["data-probe-messages"]
