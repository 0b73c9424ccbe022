"""Writes a `torch.save` zip checkpoint (`pytorch_model.bin`) without torch: the pickle
torch writes (an OrderedDict of `torch._utils._rebuild_tensor_v2` calls on persistent
storages), made by a Pickler against stand-in `torch` modules. Run as a script in its own
process, so the stand-ins never meet a real import of torch:

    python torch_bin.py SRC.safetensors OUT.bin
"""

import collections
import io
import pickle
import sys
import types
import zipfile


def write_bin(tensors, out):
    """`tensors`: {name: C-contiguous numpy float32 / float16 array}."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils

    def storage_class(name):
        cls = type(name, (), {})
        cls.__module__, cls.__qualname__ = "torch", name
        setattr(torch, name, cls)
        return cls

    classes = {"float32": storage_class("FloatStorage"), "float16": storage_class("HalfStorage")}

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, array):
            self.storage, self.array = storage, array

        def __reduce__(self):
            a = self.array
            stride = tuple(s // a.itemsize for s in a.strides)
            return (_rebuild_tensor_v2,
                    (self.storage, 0, tuple(a.shape), stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                cls = classes[obj.array.dtype.name]
                return ("storage", cls, obj.key, "cpu", obj.array.size)
            return None

    state = collections.OrderedDict()
    storages = []
    for i, (name, a) in enumerate(tensors.items()):
        s = Storage(str(i), a)
        storages.append(s)
        state[name] = Tensor(s, a)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.array.tobytes())
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    from safetensors.numpy import load_file

    write_bin(load_file(sys.argv[1]), sys.argv[2])
