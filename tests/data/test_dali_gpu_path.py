"""The DALI GPU path, checked on a machine without CUDA: the GPU graph against DALI's operator
registry, the pipeline's lifetime when its loader is dropped or closed, and how device failures
and undecodable files are told apart (with a scripted stand-in for the pipeline)."""
import gc
import os
import weakref

import pytest

pytest.importorskip("nvidia.dali")
from nvidia.dali import backend as dali_backend  # noqa: E402
from PIL import Image  # noqa: E402

from hvd_largebatch.data import DaliLoader, FileIndex, GlobalSampler, ImageTransform  # noqa: E402
from hvd_largebatch.data import dali_loader  # noqa: E402
from hvd_largebatch.data.pipelines import build_pipeline  # noqa: E402
from hvd_largebatch.errors import DataError, DeviceError  # noqa: E402

REGISTRY = {"cpu": set(dali_backend.RegisteredCPUOps()), "gpu": set(dali_backend.RegisteredGPUOps()),
            "mixed": set(dali_backend.RegisteredMixedOps())}


def graph_operators(pipe, with_inputs=False):
    """(schema name, device, output devices) of every operator of a defined, unbuilt pipeline
    (and the input devices, with ``with_inputs``).

    DALI has no public API for an unbuilt graph; this reads the Python-side graph that
    ``Pipeline.build`` would hand to the backend (DALI 2.4: ``_build_graph``, ``_ops``)."""
    pipe._build_graph()
    rows = []
    for instance in pipe._ops:
        op = instance._op
        schema = getattr(op, "schema_name", None) or type(op).__name__
        row = (schema, op.device, [out.device for out in instance.outputs])
        rows.append(row + ([i.device for i in instance._inputs],) if with_inputs else row)
    return rows, [out.device for out in pipe._graph_outputs]


def no_source():
    raise AssertionError("an unbuilt pipeline never calls its source")


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_gpu_graph_uses_registered_operators_on_their_devices(train):
    pipe = build_pipeline(no_source, ImageTransform(crop_size=16, resize_shorter=20), train=train,
                          batch_size=4, device_id=0, num_threads=1, seed=0, build=False)
    ops, outputs = graph_operators(pipe)
    for schema, device, _ in ops:
        assert schema in REGISTRY[device], f"{schema} is not a registered {device} operator"
    devices = {schema: device for schema, device, _ in ops}
    decoder = "decoders__ImageSlice" if train else "decoders__Image"
    assert devices[decoder] == "mixed"
    assert "decoders__ImageRandomCrop" not in devices and not any("random" in s for s in devices)
    assert devices["ExternalSource"] == "cpu"  # encoded bytes are read on the host
    assert devices["Resize"] == devices["CropMirrorNormalize"] == "gpu"
    for schema, device, out_devices in ops:  # everything after the decoder stays on the GPU
        if device in ("mixed", "gpu"):
            assert out_devices == ["gpu"], schema
    assert outputs == ["gpu"]


def test_gpu_training_graph_takes_the_host_drawn_windows_and_flips_on_the_host():
    # argument inputs of GPU / mixed operators must be CPU data: the crop window (anchor, shape)
    # of the mixed slice decoder and the per-sample mirror of CropMirrorNormalize come from the
    # external source on the CPU; the decoder receives them as its 2nd and 3rd inputs
    pipe = build_pipeline(no_source, ImageTransform(crop_size=16, resize_shorter=20), train=True,
                          batch_size=4, device_id=0, num_threads=1, seed=0, build=False)
    ops, _ = graph_operators(pipe, with_inputs=True)
    inputs = {schema: (device, ins) for schema, device, _, ins in ops}
    assert inputs["decoders__ImageSlice"] == ("mixed", ["cpu", "cpu", "cpu"])
    assert inputs["CropMirrorNormalize"] == ("gpu", ["gpu", "cpu"])  # images, mirror
    assert [s for s, *_ in ops].count("ExternalSource") == 4
    schema = dali_backend.GetSchema("decoders__ImageSlice")
    assert {"adjust_orientation", "axis_names", "jpeg_fancy_upsampling"} <= set(schema.GetArgumentNames())


def test_cpu_graph_has_no_device_operator():
    pipe = build_pipeline(no_source, ImageTransform(crop_size=16, resize_shorter=20), train=True,
                          batch_size=4, device_id=None, num_threads=1, seed=0, build=False)
    ops, outputs = graph_operators(pipe)
    assert {device for _, device, _ in ops} == {"cpu"} and outputs == ["cpu"]
    assert all(schema in REGISTRY["cpu"] for schema, _, _ in ops)


def test_gpu_pipeline_fails_only_at_build_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    pipe = build_pipeline(no_source, ImageTransform(crop_size=16, resize_shorter=20), train=False,
                          batch_size=4, device_id=0, num_threads=1, seed=0, build=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        pipe.build()


def test_mixed_decoder_takes_fancy_upsampling():
    # the argument the GPU branch passes exists for both decoders in this DALI
    for schema in ("decoders__Image", "decoders__ImageSlice"):
        assert "jpeg_fancy_upsampling" in dali_backend.GetSchema(schema).GetArgumentNames()


# -- lifetime -------------------------------------------------------------------------------------
class OneBatch:
    """Schedule test double: one epoch of one global batch of all samples."""

    def __init__(self, n):
        self.dataset_size, self.drop_last, self.max_global_batch = n, False, n

    def epoch_batches(self, epoch):
        return [self.dataset_size]


@pytest.fixture(scope="module")
def png_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    os.makedirs(root / "c")
    for k in range(4):
        Image.new("L", (12, 10), color=40 * k).save(root / "c" / f"{k}.png")
    return FileIndex.from_folder(str(root))


def make_loader(index, **kwargs):
    n = len(index)
    sampler = GlobalSampler(n, OneBatch(n), 1, 0, drop_last=False, shuffle=False)
    return DaliLoader(index, sampler, ImageTransform(crop_size=8, resize_shorter=8), train=False,
                      num_threads=1, **kwargs)


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_dropped_loader_frees_its_pipeline_without_gc(png_index, no_gc):
    loader = make_loader(png_index)
    assert len(list(loader.epoch(0))) == 1
    pipe = weakref.ref(loader._pipe)
    del loader
    assert pipe() is None


def test_closed_loader_frees_its_pipeline_and_refuses_more_work(png_index, no_gc):
    loader = make_loader(png_index)
    batches = loader.epoch(0)
    next(batches)  # an epoch in flight
    pipe = weakref.ref(loader._pipe)
    batches.close()
    loader.close()
    assert pipe() is None
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader.epoch(1))


# -- device errors and undecodable files ----------------------------------------------------------
class ScriptedPipeline:
    """Stands in for a built DALI pipeline: pulls each batch from the loader's source like
    ``schedule_run`` does, and fails every ``outputs()`` call with the given error."""

    def __init__(self, source, error):
        self.source, self.error = source, error

    def schedule_run(self):
        self.source()

    def outputs(self):
        raise self.error

    def reset(self):
        pass


def scripted_loader(monkeypatch, index, error):
    monkeypatch.setattr("hvd_largebatch.data.pipelines.build_pipeline",
                        lambda source, *a, **k: ScriptedPipeline(source, error))
    return make_loader(index, device_id=None)


@pytest.mark.parametrize("message", [
    "Error in thread 0: CUDA error: an illegal memory access was encountered",
    "[/opt/dali/dali/core/cuda_error.h:118] CUDA runtime API error cudaErrorMemoryAllocation",
    "CUDA allocation failed: out of memory",
    "nvJPEG error (NVJPEG_STATUS_EXECUTION_FAILED) in decoder",
    "Critical error in pipeline:\nError in MIXED operator `decoders.image`:\n"
    "CUDA error: out of memory\nCurrent pipeline object is no longer valid.",
])
def test_device_failure_raises_device_error_even_with_a_corrupt_file(monkeypatch, tmp_path,
                                                                     message):
    root = tmp_path / "set"
    os.makedirs(root / "c")
    Image.new("L", (12, 10)).save(root / "c" / "0.png")
    (root / "c" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    loader = scripted_loader(monkeypatch, FileIndex.from_folder(str(root)), RuntimeError(message))
    with pytest.raises(DeviceError) as raised:
        list(loader.epoch(0))
    text = str(raised.value)
    assert text.startswith("cpu: DALI failed") and "\n" not in text  # one line
    assert text.endswith(next(ln for ln in message.splitlines() if "CUDA" in ln or "NVJPEG" in ln))
    assert raised.value.device == "cpu" and not isinstance(raised.value, DataError)


def test_decoder_failure_on_a_corrupt_file_stays_a_data_error(monkeypatch, tmp_path):
    root = tmp_path / "set"
    os.makedirs(root / "c")
    Image.new("L", (12, 10)).save(root / "c" / "0.png")
    corrupt = root / "c" / "1.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    error = RuntimeError("Error in thread 0: [decoders__Image] Failed to decode sample: "
                         "unsupported or corrupt bitstream")
    loader = scripted_loader(monkeypatch, FileIndex.from_folder(str(root)), error)
    with pytest.raises(DataError, match=f"{corrupt}: cannot decode sample 1"):
        list(loader.epoch(0))


@pytest.mark.parametrize("message,expected", [
    ("CUDA error: out of memory", "CUDA error"),
    ("cudaErrorIllegalAddress at kernel launch", "cudaErrorIllegalAddress"),
    ("CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_LAUNCH_FAILED"),
    ("std::bad_alloc", "bad_alloc"),
    ("NVIMGCODEC_STATUS_INTERNAL_ERROR", "NVIMGCODEC_STATUS_INTERNAL_ERROR"),
    ("Failed to decode: NVJPEG_STATUS_BAD_JPEG", None),  # the file's fault
    ("Unsupported image type", None),
])
def test_device_failure_classification(message, expected):
    assert dali_loader.device_failure(message) == expected
