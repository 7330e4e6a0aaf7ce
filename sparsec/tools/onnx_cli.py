"""``sparsec export`` and ``sparsec run-onnx``: the common ONNX paths from the shell.

    sparsec export artifact/ model.onnx --mode custom        # a saved CompiledModel to ONNX
    sparsec run-onnx model.onnx --dim s27=512 --repeat 5     # run it in onnxruntime, time it

``run-onnx`` feeds ``--inputs file.npz`` (arrays named like the model's inputs) or, without
it, synthetic inputs at the export's example shapes (metadata ``sparsec.example_shapes``),
symbolic dimensions overridden with ``--dim NAME=VALUE``: floats random normal, integers
and booleans ones (token id 1, attention mask "attend").
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def add_parser(subparsers) -> None:
    """Add ``export`` and ``run-onnx`` to the ``sparsec`` command's sub-parsers."""
    export = subparsers.add_parser("export", help="export a saved compiled model to ONNX")
    export.add_argument("artifact", help="directory written by CompiledModel.save()")
    export.add_argument("output", help="the .onnx file to write")
    export.add_argument("--mode", choices=("custom", "decomposed"), default="custom",
                        help="custom: sparsec ops (run with sparsec run-onnx / ort_session); "
                             "decomposed: standard ONNX ops only (default: custom)")
    export.add_argument("--opset", type=int, default=None,
                        help="default-domain opset version (18 to the newest torch's exporter knows)")
    export.add_argument("--static-length", action="store_true",
                        help="export at the example shapes (decomposed: masks stored as initializers)")
    export.set_defaults(handler=export_command)

    run = subparsers.add_parser("run-onnx", help="run an exported ONNX model in onnxruntime")
    run.add_argument("model", help="the .onnx file")
    run.add_argument("--inputs", help=".npz file of inputs, keyed by the model's input names")
    run.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                     help="value of a symbolic dimension for synthetic inputs (repeatable)")
    run.add_argument("--repeat", type=int, default=1, help="runs to time; the median is printed")
    run.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    run.add_argument("--output", help="write the outputs to this .npz file")
    run.set_defaults(handler=run_onnx_command)


def export_command(args) -> int:
    import sparsec
    from sparsec.codegen.onnx import export_onnx

    compiled = sparsec.load(args.artifact)
    path = export_onnx(compiled.graph_module, compiled.example_args, compiled.example_kwargs, compiled.plan,
                       args.output, mode=args.mode, opset=args.opset, dynamic_length=not args.static_length)
    print(f"wrote {path} ({args.mode} mode, checked with onnx.checker)")
    return 0


def _synthetic_inputs(session, example_shapes: list, dims: dict) -> dict:
    feeds = {}
    rng = np.random.default_rng(0)
    for index, spec in enumerate(session.get_inputs()):
        example = example_shapes[index] if index < len(example_shapes) else None
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in dims:
                shape.append(dims[dim])
            elif example is not None:
                shape.append(example[axis])
            else:
                raise ValueError(f"input {spec.name} has symbolic dimension {dim!r}; pass --dim {dim}=VALUE")
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input {spec.name} has type {spec.type}; pass it with --inputs")
        feeds[spec.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else np.ones(shape, dtype=dtype))
    return feeds


def _parse_dims(items: list[str]) -> dict[str, int]:
    """``--dim NAME=VALUE`` options as ``{NAME: VALUE}``."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise ValueError(f"--dim {item!r}: write a symbolic dimension as NAME=VALUE with a positive "
                             "integer value, e.g. --dim s27=512")
        dims[name] = int(value)
    return dims


def run_onnx_command(args) -> int:
    import onnx

    from sparsec.runtime.ort import ort_session

    options = {"intra_op_num_threads": args.threads} if args.threads else {}
    session = ort_session(args.model, **options)
    if args.inputs:
        with np.load(args.inputs) as data:
            feeds = {name: data[name] for name in data.files}
    else:
        metadata = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
        feeds = _synthetic_inputs(session, json.loads(metadata.get("sparsec.example_shapes", "[]")),
                                  _parse_dims(args.dim))
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        times.append(time.perf_counter() - start)
    for name, value in feeds.items():
        print(f"input  {name}: {value.dtype}{list(value.shape)}")
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, outputs):
        print(f"output {name}: {value.dtype}{list(value.shape)}")
    print(f"median latency {statistics.median(times) * 1e3:.2f} ms over {len(times)} run(s)")
    if args.output:
        np.savez(args.output, **dict(zip(names, outputs)))
    return 0
