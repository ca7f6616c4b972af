"""The one way the launcher reads a pickle: nothing a pickle names is imported or called unless it
is on a short list. Unpickling runs whatever callable the file names (`os.system` from a
`__reduce__`), and the pickles the launcher reads lie in folders others may write to (OUT, a
postprocessing file passed on the command line). What nnU-Net writes needs little: its properties
(`case.pkl`: dicts, lists, tuples, numbers, strings and numpy arrays or scalars) and its
postprocessing form (the functions of nnunetv2.postprocessing and their keyword arguments)."""

from __future__ import annotations

import io
import pickle

# numpy arrays pickle as _reconstruct + ndarray + dtype (protocol 5: _frombuffer + dtype); numpy
# scalars (np.int64, ...) as dtype + scalar; numpy 1 names its modules numpy.core, numpy 2 numpy._core
DATA_CONSTRUCTORS = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("scalar", "_reconstruct")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("_codecs", "encode"),  # protocol 2's bytes (a numpy array's buffer): a string to bytes, nothing more
}


class NotAllowed(Exception):
    """The pickle names something off the list (its module.name is the message)."""


class Reference:
    """A function a pickle names, recorded instead of imported: checking a file must not import
    (or run) anything it names."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise NotAllowed(f"{self.module}.{self.name} is named, not loaded")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, functions_of: str | None, resolve: bool):
        super().__init__(file)
        self.functions_of, self.resolve = functions_of, resolve

    def find_class(self, module, name):
        if (module, name) in DATA_CONSTRUCTORS:
            return super().find_class(module, name)
        of = self.functions_of
        if of is not None and (module == of or module.startswith(of + ".")):
            return super().find_class(module, name) if self.resolve else Reference(module, name)
        raise NotAllowed(f"{module}.{name}")


def loads(content: bytes, functions_of: str | None = None, resolve: bool = False):
    """Unpickle `content` allowing DATA_CONSTRUCTORS and, when `functions_of` names a package,
    the functions of its modules: as Reference, or imported when `resolve`. Raises NotAllowed for
    anything else the pickle names, and pickle's own errors for a file that is no pickle."""
    return _RestrictedUnpickler(io.BytesIO(content), functions_of, resolve).load()


def load_data(path: str):
    """A pickle of plain data (nnU-Net's properties files): no function of any module."""
    with open(path, "rb") as f:
        return loads(f.read())
