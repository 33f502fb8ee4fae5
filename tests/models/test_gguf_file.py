"""Our GGUF reader against gguf-py's GGUFReader as the oracle (metadata values, tensor names, shapes, kinds and bytes)
on files written here by GGUFWriter and on the real SmolLM2 file, and a clear CorruptGGUF for a file cut anywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from sagellm.runtime.models.gguf_file import CorruptGGUF, GGUFFile, StringArray, read_gguf
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model

Q = GGMLQuantizationType
V = GGUFValueType
TENSOR_KINDS = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K)
TOKENS = ["<s>", "</s>", "héllo", "", "wörld ▁x", "🙂"] * 50  # non-ASCII and empty strings among them


def write_gguf(path: Path, alignment: int | None = None) -> Path:
    """Every scalar type, strings, arrays of numbers, strings and arrays, and tensors of several kinds."""
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for name, kind, value in [
        ("u8", V.UINT8, 200), ("i8", V.INT8, -5), ("u16", V.UINT16, 60000), ("i16", V.INT16, -30000),
        ("u32", V.UINT32, 4_000_000_000), ("i32", V.INT32, -7), ("u64", V.UINT64, 2**63 + 5),
        ("i64", V.INT64, -(2**40)), ("f32", V.FLOAT32, 1e-5), ("f64", V.FLOAT64, 0.1), ("yes", V.BOOL, True),
        ("no", V.BOOL, False),
    ]:  # fmt: skip
        writer.add_key_value(f"test.{name}", value, kind)
    writer.add_string("test.text", "a chat template {{ x }} ✓")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.scores", [float(i) / 3 for i in range(len(TOKENS))])
    writer.add_array("tokenizer.ggml.token_type", [i % 4 for i in range(len(TOKENS))])
    writer.add_key_value("test.bytes", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
    writer.add_key_value("test.int64s", [-(2**60), 3], V.ARRAY, sub_type=V.INT64)
    writer.add_array("test.flags", [True, False, True])
    writer.add_array("test.nested", [[1, 2, 3], ["a", "bc"]])
    rng = np.random.default_rng(0)
    for i, kind in enumerate(TENSOR_KINDS):
        block, block_bytes = GGML_QUANT_SIZES[kind]
        rows, cols = 3 + i, 256
        raw = rng.integers(0, 256, (rows, cols // block * block_bytes), dtype=np.uint8)
        writer.add_tensor(f"t{i}.{kind.name}", raw, raw_dtype=kind)
    writer.add_tensor("vector", rng.standard_normal(7).astype(np.float32))  # 28 bytes: the next needs padding
    writer.add_tensor("cube", rng.standard_normal((2, 3, 4)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def plain(value: Any) -> Any:
    """A metadata value as gguf-py's `contents()` gives it: arrays as lists."""
    return value.tolist() if isinstance(value, (np.ndarray, StringArray)) else value


def assert_same_as_gguf_py(ours: GGUFFile, path: Path) -> None:
    oracle = GGUFReader(path)
    fields = {k: f for k, f in oracle.fields.items() if not k.startswith("GGUF.")}
    assert ours.version == oracle.fields["GGUF.version"].contents()
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        if field.types[:2] != [V.ARRAY, V.ARRAY]:  # gguf-py flattens arrays of arrays; tested on their own below
            assert plain(ours.metadata[key]) == field.contents(), key
    assert (ours.alignment, ours.data_offset) == (oracle.alignment, oracle.data_offset)
    assert list(ours.tensors) == [t.name for t in oracle.tensors]
    for expected in oracle.tensors:
        tensor = ours.tensors[expected.name]
        assert tensor.kind == expected.tensor_type and tensor.shape == tuple(reversed(expected.shape.tolist()))
        assert tensor.data.dtype == np.uint8 and tensor.data.ndim == 1
        assert np.array_equal(tensor.data, np.asarray(expected.data).reshape(-1).view(np.uint8)), expected.name
        assert not tensor.data.flags.owndata and not tensor.data.flags.writeable  # a view of the mapped file


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_written_files_read_as_gguf_py_reads_them(tmp_path: Path, alignment: int | None) -> None:
    path = write_gguf(tmp_path / "t.gguf", alignment)
    ours = read_gguf(path)
    assert_same_as_gguf_py(ours, path)
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    assert all(
        (t.data.ctypes.data - ours.tensors["t0.F32"].data.ctypes.data) % ours.alignment == 0
        for t in ours.tensors.values()
    )


def test_values_keep_their_types(tmp_path: Path) -> None:
    metadata = read_gguf(write_gguf(tmp_path / "t.gguf")).metadata
    assert (metadata["test.u64"], metadata["test.i64"], metadata["test.yes"]) == (2**63 + 5, -(2**40), True)
    assert metadata["test.f32"] == float(np.float32(1e-5)) and metadata["test.f64"] == 0.1
    tokens = metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, StringArray) and len(tokens) == len(TOKENS) and tokens.tolist() == TOKENS
    assert metadata["test.bytes"].dtype == np.uint8 and metadata["test.int64s"].dtype == np.int64
    assert metadata["test.flags"].dtype == np.bool_ and metadata["test.flags"].tolist() == [True, False, True]
    assert [plain(a) for a in metadata["test.nested"]] == [[1, 2, 3], ["a", "bc"]]


# Where to cut the file: the byte count kept, found with gguf-py's offsets.
CUTS: dict[str, Callable[[GGUFReader], int]] = {
    "in the magic and version": lambda r: 6,
    "in the counts": lambda r: 20,
    "in a key": lambda r: r.fields["test.u8"].offset + 5,
    "in a scalar": lambda r: r.fields["test.u64"].offset + len("test.u64") + 8 + 4 + 3,
    "in a string array": lambda r: r.fields["tokenizer.ggml.tokens"].offset + 400,
    "in a number array": lambda r: r.fields["tokenizer.ggml.scores"].offset + 100,
    "in the tensor infos": lambda r: r.tensors[1].field.offset + 5,
    "before the data": lambda r: r.data_offset - 1,
    "in the first tensor's data": lambda r: r.tensors[0].data_offset + 10,
    # The writer pads after the last tensor too: the file's own last byte is padding.
    "a byte short of the last tensor's data": lambda r: r.tensors[-1].data_offset + r.tensors[-1].n_bytes - 1,
}


@pytest.mark.parametrize("where", CUTS)
def test_a_file_cut_anywhere_is_refused_clearly(tmp_path: Path, where: str) -> None:
    full = write_gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: CUTS[where](GGUFReader(full))])
    with pytest.raises(CorruptGGUF, match="past the file's end|cannot fit|fewer than a GGUF header") as caught:
        read_gguf(cut)
    assert "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError, match=f"^{cut}: corrupt or truncated GGUF file: "):
        load_model(cut)


@pytest.mark.parametrize(
    ("offset", "patch", "message"),
    [
        (4, (1).to_bytes(4, "little"), "GGUF version 1"),
        (4, (3 << 24).to_bytes(4, "little"), "big-endian"),
        (16, (2**40).to_bytes(8, "little"), "key/value pairs at byte 24 cannot fit"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path: Path, offset: int, patch: bytes, message: str) -> None:
    data = bytearray(write_gguf(tmp_path / "t.gguf").read_bytes())
    data[offset : offset + len(patch)] = patch
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(CorruptGGUF, match=message):
        read_gguf(tmp_path / "bad.gguf")


def test_unknown_tensor_kinds_and_odd_alignment_are_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf")
    info = GGUFReader(path).tensors[0].field  # name length, name, n_dims, dims, kind, offset
    kind_at = info.offset + sum(int(part.nbytes) for part in info.parts[:4])
    data = bytearray(path.read_bytes())
    data[kind_at : kind_at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(data)
    with pytest.raises(CorruptGGUF, match="tensor t0.F32 has unknown type 99"):
        read_gguf(path)

    writer = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    writer.add_uint32("general.alignment", 48)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(CorruptGGUF, match="general.alignment must be a power of two"):
        read_gguf(tmp_path / "a.gguf")


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_reads_as_gguf_py_reads_it(smollm2_dir: Path) -> None:
    path = smollm2_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = read_gguf(path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152 and len(ours.tensors) == 272
    assert_same_as_gguf_py(ours, path)
