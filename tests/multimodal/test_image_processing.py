"""Our image preprocessing against Hugging Face's own (the PIL/NumPy image processor classes of transformers, the
only ones runnable without torchvision) on seeded random-pixel images of several sizes and PIL modes: the same
pixel values (bit for bit), shapes, Qwen grids, Idefics3 tile grids and masks, Gemma 3 crops, and per image the
placeholder-token count HF's processor writes into the prompt (its own `replace_image_token`, counted)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.multimodal.image_processing import ProcessedImages, image_processor_for

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Random pixels in `mode`; a P image gets a random palette and a transparent index, so it is composited."""
    rng = np.random.default_rng(seed)
    bands = Image.getmodebands(mode)
    image = Image.frombytes(mode, (width, height), rng.integers(0, 256, width * height * bands, np.uint8).tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
        image.info["transparency"] = 7
    return image


# Every mode HF's convert_rgb meets (alpha composited onto white; palette, grey and CMYK converted) and sizes that
# are wide, tall, square, smaller than any target and larger than all.
IMAGES = [
    random_image(mode, width, height, seed)
    for seed, (mode, width, height) in enumerate(
        [
            ("RGB", 37, 23),
            ("RGBA", 20, 50),
            ("L", 64, 64),
            ("P", 33, 47),
            ("CMYK", 90, 18),
            ("LA", 9, 13),
            ("RGB", 130, 70),
            ("RGB", 4, 6),
        ]
    )
]


def hf_processor(cls: type, **attributes: object) -> object:
    """A Hugging Face processor with just the attributes its replace_image_token reads (no tokenizer here)."""
    processor = object.__new__(cls)
    vars(processor).update(attributes)
    return processor


def hf_token_counts(processor: object, image_inputs: dict, image_token: str, num_images: int) -> tuple[int, ...]:
    return tuple(processor.replace_image_token(image_inputs, i).count(image_token) for i in range(num_images))


def assert_same_pixels(ours: ProcessedImages, theirs: torch.Tensor) -> None:
    assert ours.pixel_values.dtype == theirs.dtype == torch.float32
    assert ours.pixel_values.shape == theirs.shape
    assert torch.equal(ours.pixel_values, theirs)  # bit for bit: the same steps in the same dtypes


LLAVA_PROCESSOR = {"patch_size": 8, "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"}
CLIP_BASE = {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
LLAVA_1_5 = {**CLIP_BASE, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3}
OLD_INT_SIZES = {**CLIP_BASE, "size": 40, "crop_size": 24}
CROP_LARGER_THAN_IMAGE = {**CLIP_BASE, "size": {"shortest_edge": 20}, "crop_size": {"height": 32, "width": 28}}
PAD_TO_SQUARE = {**LLAVA_1_5, "image_processor_type": "LlavaImageProcessor", "do_pad": True}


@pytest.mark.parametrize(
    ("config", "hf_class", "processor_config"),
    [
        (LLAVA_1_5, CLIPImageProcessorPil, LLAVA_PROCESSOR),
        (OLD_INT_SIZES, CLIPImageProcessorPil, {**LLAVA_PROCESSOR, "vision_feature_select_strategy": "full"}),
        (CROP_LARGER_THAN_IMAGE, CLIPImageProcessorPil, LLAVA_PROCESSOR),
        (PAD_TO_SQUARE, LlavaImageProcessorPil, LLAVA_PROCESSOR),
    ],
    ids=["llava-1.5", "old-int-sizes-full", "crop-larger-than-image", "llava-pad-to-square"],
)
def test_clip_matches_hf(config: dict, hf_class: type, processor_config: dict) -> None:
    ours = image_processor_for(config, processor_config).preprocess(IMAGES)
    theirs = hf_class.from_dict(config)(IMAGES, return_tensors="pt")
    assert_same_pixels(ours, theirs["pixel_values"])
    llava = hf_processor(LlavaProcessor, image_token="<image>", **processor_config)
    assert ours.num_tokens == hf_token_counts(llava, theirs, "<image>", len(IMAGES))
    assert ours.pixel_values_per_image == (1,) * len(IMAGES)


GEMMA3 = {
    "image_processor_type": "Gemma3ImageProcessor",
    "size": {"height": 32, "width": 32},
    "resample": 2,
    "image_mean": HALF,
    "image_std": HALF,
    "do_pan_and_scan": None,
    "image_seq_length": 16,
}
PAN_AND_SCAN = {
    "do_pan_and_scan": True,
    "pan_and_scan_min_crop_size": 8,
    "pan_and_scan_max_num_crops": 3,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


@pytest.mark.parametrize("config", [GEMMA3, {**GEMMA3, **PAN_AND_SCAN}], ids=["gemma3", "gemma3-pan-and-scan"])
def test_gemma3_matches_hf(config: dict) -> None:
    ours = image_processor_for(config).preprocess(IMAGES)
    theirs = Gemma3ImageProcessorPil.from_dict(config)(IMAGES, return_tensors="pt")
    assert_same_pixels(ours, theirs["pixel_values"])
    assert ours.num_crops == tuple(theirs["num_crops"].tolist())
    if config.get("do_pan_and_scan"):
        assert sum(ours.num_crops) > 0  # the wide and tall images were cropped
    image_tokens = "<image_soft_token>" * config["image_seq_length"]
    gemma3 = hf_processor(Gemma3Processor, full_image_sequence=f"\n\n<start_of_image>{image_tokens}<end_of_image>\n\n")
    assert ours.num_tokens == hf_token_counts(gemma3, theirs, "<image_soft_token>", len(IMAGES))
    assert sum(ours.pixel_values_per_image) == len(ours.pixel_values)


def test_siglip_matches_hf() -> None:
    config = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 28, "width": 36}}
    ours = image_processor_for(config, {"image_seq_length": 9}).preprocess(IMAGES)
    assert_same_pixels(ours, SiglipImageProcessorPil.from_dict(config)(IMAGES, return_tensors="pt")["pixel_values"])
    assert ours.num_tokens == (9,) * len(IMAGES) and ours.num_crops is None


QWEN2_VL = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 28 * 28 * 2,
    "max_pixels": 28 * 28 * 8,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}
QWEN3_VL = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "size": {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 6},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": HALF,
    "image_std": HALF,
}


@pytest.mark.parametrize(
    "config",
    [QWEN2_VL, {**QWEN2_VL, "image_processor_type": "Qwen2_5_VLImageProcessor", "max_pixels": 28 * 28 * 30}, QWEN3_VL],
    ids=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"],
)
def test_qwen_vl_matches_hf(config: dict) -> None:
    ours = image_processor_for(config).preprocess(IMAGES)
    hf = Qwen2VLImageProcessorPil.from_dict(config)
    theirs = hf(IMAGES, return_tensors="pt")
    assert_same_pixels(ours, theirs["pixel_values"])
    assert torch.equal(ours.image_grid_thw, theirs["image_grid_thw"])
    qwen = hf_processor(Qwen2VLProcessor, image_processor=hf, image_token="<|image_pad|>")
    assert ours.num_tokens == hf_token_counts(qwen, theirs, "<|image_pad|>", len(IMAGES))
    assert ours.pixel_values_per_image == tuple(theirs["image_grid_thw"].prod(-1).tolist())


IDEFICS3 = {
    "image_processor_type": "Idefics3ImageProcessor",
    "size": {"longest_edge": 64},
    "resample": 1,
    "max_image_size": {"longest_edge": 32},
    "do_image_splitting": True,
    "image_mean": HALF,
    "image_std": HALF,
    "do_pad": True,
}
TAGS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>", "image_seq_len": 5}


@pytest.mark.parametrize(
    ("config", "hf_class", "hf_prompt"),
    [
        (IDEFICS3, Idefics3ImageProcessorPil, hf_processor(Idefics3Processor, global_image_tag="<global-img>", **TAGS)),
        (
            {**IDEFICS3, "image_processor_type": "SmolVLMImageProcessor", "size": {"longest_edge": 80}},
            SmolVLMImageProcessorPil,
            hf_processor(SmolVLMProcessor, global_image_token="<global-img>", **TAGS),
        ),
        (
            {**IDEFICS3, "do_image_splitting": False, "do_pad": False},
            Idefics3ImageProcessorPil,
            hf_processor(Idefics3Processor, global_image_tag="<global-img>", **TAGS),
        ),
    ],
    ids=["idefics3", "smolvlm", "no-splitting"],
)
def test_idefics3_matches_hf(config: dict, hf_class: type, hf_prompt: object) -> None:
    ours = image_processor_for(config, {"image_seq_len": 5}).preprocess(IMAGES)
    theirs = hf_class.from_dict(config)(IMAGES, return_tensors="pt", return_row_col_info=True)
    assert_same_pixels(ours, theirs["pixel_values"])
    assert (ours.rows, ours.cols) == (tuple(theirs["rows"][0]), tuple(theirs["cols"][0]))
    if config["do_pad"]:
        assert torch.equal(ours.pixel_attention_mask, theirs["pixel_attention_mask"])
        assert max(ours.rows) > 1 and max(ours.cols) > 1  # some images were split both ways
    else:
        assert ours.pixel_attention_mask is None and "pixel_attention_mask" not in theirs
    assert ours.num_tokens == hf_token_counts(hf_prompt, theirs, "<image>", len(IMAGES))
    assert sum(ours.pixel_values_per_image) == ours.pixel_values.shape[1]


def test_one_image_alone_is_a_list_of_one() -> None:
    processor = image_processor_for(QWEN3_VL)
    alone, listed = processor.preprocess(IMAGES[0]), processor.preprocess(IMAGES[:1])
    assert torch.equal(alone.pixel_values, listed.pixel_values) and alone.num_tokens == listed.num_tokens


def test_unknown_processor_type_names_the_known_ones() -> None:
    with pytest.raises(FieldError, match="'MllamaImageProcessor' is not one we preprocess; we take CLIPImage"):
        image_processor_for({"image_processor_type": "MllamaImageProcessor"})


def test_llava_without_patch_size_says_where_it_is() -> None:
    with pytest.raises(FieldError, match="patch_size: missing; the checkpoint's processor_config.json"):
        image_processor_for(CLIP_BASE)


def test_bad_inputs_are_refused() -> None:
    processor = image_processor_for(QWEN2_VL)
    with pytest.raises(InvalidInput, match="too elongated"):  # as HF refuses it
        processor.preprocess(random_image("RGB", 402, 2, 0))
    with pytest.raises(InvalidInput, match="must be a PIL.Image.Image, got ndarray"):
        processor.preprocess([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(InvalidInput, match="no images"):
        processor.preprocess([])


def test_serving_code_does_not_import_transformers() -> None:
    """transformers is the tests' oracle only: the server must run without it."""
    package = Path(__file__).parents[2] / "runtime" / "multimodal"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] in ("transformers", "torchvision") for name in names), source
