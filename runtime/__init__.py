"""Runtime: artifacts, reference kernels and (imported lazily, as it loads onnxruntime)
``ort_session``, an onnxruntime session with sparsec's custom ops registered."""


def __getattr__(name: str):
    if name == "ort_session":
        from sparsec.runtime.ort import ort_session

        return ort_session
    raise AttributeError(f"module 'sparsec.runtime' has no attribute {name!r}")
