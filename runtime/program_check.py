"""Make a saved program's JSON safe to hand to torch.export's deserializer.

torch.export's JSON deserializer (``torch._export.serde.serialize``) runs strings of the
program as code in three places: symbolic expressions go through ``sympy.sympify`` (an
``eval``), ``guards_code`` is ``exec``-ed by ``ExportedProgram.module()``, and names end up
in the Python source that ``torch.fx`` generates and ``exec``-s for every GraphModule. Node
targets are resolved by ``getattr`` from ``torch``, ``operator`` and ``math``, so a crafted
target such as ``torch.serialization.os.system`` would become a graph call.

:func:`sanitize_program_json` therefore checks, before anything is deserialized:

- every node target is an operator of an allowed namespace (``aten``, ``prims``, ``sparsec``)
  or one of the symbolic-size operators torch.export itself emits;
- every symbolic expression uses only the grammar torch writes (``Symbol('s0', ...)``,
  ``Integer(3)``, arithmetic, and a fixed list of sympy functions);
- every name (nodes, inputs, parameters, module paths, pytree keys) is made of identifier
  characters and dots;

and it drops what is not needed to run and would otherwise be code or free text:
``guards_code`` (``module()`` regenerates the input guards from the graph's own shapes and
ranges) and node metadata (stack traces, module stacks). Anything else raises
:class:`~sparsec.ir.errors.ArtifactUnsafeError`.
"""
from __future__ import annotations

import json
import re

from sparsec.ir.errors import ArtifactUnsafeError

_ALLOWED_NAMESPACES = ("aten", "prims", "sparsec")
_OPERATOR_TARGET = re.compile(r"^torch\.ops\.(%s)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$" % "|".join(_ALLOWED_NAMESPACES))
# The symbolic-size operators torch.export serialises by Python name (serialize.py _SYM_OPS).
_SYMBOLIC_TARGETS = {
    *(f"_operator.{name}" for name in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
                                       "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift",
                                       "getitem")),
    "math.trunc",
    *(f"torch.{name}" for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min",
                                   "sym_sqrt")),
}

_NAME = re.compile(r"^[A-Za-z0-9_.]*$")
_SYMBOL_NAME = re.compile(r"^[a-z]+[0-9]+$")
# sympy names torch's printer writes into expr_str; calls to anything else are refused.
_EXPRESSION_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor",
    "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "true", "false", "True", "False", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "Half", "One",
    "Zero", "NegativeOne", "integer", "positive", "nonnegative", "negative", "real", "finite",
    "commutative", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
}
_EXPRESSION_TOKEN = re.compile(r"""\s+|'[a-z]+[0-9]+'|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*
                                   |\*\*|//|==|!=|<=|>=|[-+*/%(),<>=~&|]""", re.VERBOSE)

# Op arguments that are strings reach the graph through repr(), never as code; versions are
# only compared; pytree specs are parsed by check_spec.
_FREE_TEXT_KEYS = {"torch_version", "schema_version"}


def _refuse(what: str) -> ArtifactUnsafeError:
    return ArtifactUnsafeError(f"the artifact's program holds {what}; sparsec.load runs no code from an "
                               "artifact, so it refuses it. Re-save the model with CompiledModel.save() "
                               "from a trusted compile")


def check_expression(text: str) -> None:
    """Refuse a symbolic expression outside the grammar torch writes (no attributes, no
    strings but symbol names, calls only to known sympy functions)."""
    position = 0
    while position < len(text):
        match = _EXPRESSION_TOKEN.match(text, position)
        if match is None:
            raise _refuse(f"a symbolic expression with {text[position:position + 20]!r}")
        token = match.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _EXPRESSION_NAMES \
                and not _SYMBOL_NAME.match(token):
            raise _refuse(f"a symbolic expression naming {token!r}")
        position = match.end()


def _check_name(value: str, where: str) -> None:
    if not _NAME.match(value):
        raise _refuse(f"a name {value[:60]!r} (in {where}) with characters outside [A-Za-z0-9_.]")


def _check_target(target) -> None:
    if isinstance(target, str) and (target in _SYMBOLIC_TARGETS or _OPERATOR_TARGET.match(target)):
        return
    raise _refuse(f"a call to {str(target)[:80]!r}, outside the operator namespaces {list(_ALLOWED_NAMESPACES)}")


def check_spec(text: str, where: str) -> None:
    """A pytree spec: JSON whose type names, contexts and keys are plain names."""
    def walk(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                _check_name(str(key), where)
                if key == "context" and isinstance(item, str):
                    try:
                        walk(json.loads(item))
                    except json.JSONDecodeError:
                        _check_name(item, where)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            _check_name(value, where)
    if not isinstance(text, str):
        raise _refuse(f"a {where} that is not text")
    try:
        walk(json.loads(text))
    except json.JSONDecodeError:
        raise _refuse(f"a {where} that is not JSON") from None


def _walk(value, key: str, op_arguments: bool) -> None:
    """Check every name and expression under ``value``; string op arguments are free text
    only inside a node's ``inputs`` (``op_arguments``)."""
    if isinstance(value, dict):
        for child_key, child in value.items():
            _check_name(str(child_key), key or "the program")
            if child_key == "as_graph":
                raise _refuse("a subgraph argument (higher-order operator)")
            if child_key == "nodes" and isinstance(child, list):
                for node in child:
                    if not isinstance(node, dict):
                        raise _refuse("a graph node that is not an object")
                    _check_target(node.get("target"))
                    node["metadata"] = {}          # stack traces, module stacks: not needed to run
                    for node_key, node_value in node.items():
                        _walk(node_value, node_key, op_arguments or node_key == "inputs")
                continue
            _walk(child, child_key, op_arguments)
    elif isinstance(value, list):
        for child in value:
            _walk(child, key, op_arguments)
    elif isinstance(value, str):
        if key == "expr_str":
            check_expression(value)
        elif key in ("in_spec", "out_spec"):
            check_spec(value, key)
        elif key in ("as_string", "as_strings") and op_arguments:
            pass
        elif value in ("Infinity", "-Infinity", "NaN"):     # how torch writes non-finite floats
            pass
        elif key not in _FREE_TEXT_KEYS:
            _check_name(value, key)


def sanitize_program_json(data: dict) -> dict:
    """Check and clean the JSON of a serialised ExportedProgram in place; returns it."""
    if not isinstance(data, dict) or not isinstance(data.get("graph_module"), dict):
        raise _refuse("no graph_module")
    data["guards_code"] = []        # exec-ed by module(); module() regenerates the input guards
    data["graph_module"]["metadata"] = {}
    for name in data.get("range_constraints") or {}:
        if not _SYMBOL_NAME.match(str(name)):
            raise _refuse(f"a range constraint on {str(name)[:60]!r}")
    _walk(data, "", False)
    return data
