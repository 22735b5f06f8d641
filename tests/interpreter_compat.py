"""Make Triton 3.6's CPU interpreter run under NumPy >= 2.4 (imported first by the interpreter subprocesses).

The interpreter holds every scalar (``tl.program_id``, a loaded length) as a one-element array and turns
it into a Python ``int`` with ``int(array)`` when a loop bound needs one (``range(lo, hi, BLOCK)``).
NumPy 2.4 no longer converts arrays with ``ndim > 0`` that way (a TypeError), so any kernel whose loop
bounds are run-time values fails there. This wraps the interpreter's tensor patching to take the single
element explicitly; it changes nothing where the conversion still works.
"""

import numpy as np


def patch() -> None:
    try:
        import triton.runtime.interpreter as interpreter
    except Exception:  # no Triton: nothing to patch
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kvcompress_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._kvcompress_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


patch()
