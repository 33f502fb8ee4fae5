"""The encoder as a stage of the graph (EPD): the `encode` operator expands a request's image placeholders and encodes
its pictures, an engine given its output runs no encoder pass of its own and gives the tokens it gives the images
themselves, a picture encoded once is not encoded again, and a corrupt image fails its request alone with a 400;
the encode node reads the encoder's weights alone. Every family through `graphs/epd.yaml` (encode, prefill and
decode in three processes, the embeddings sent on as frames): test_families_through_graphs.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sagellm.operators  # noqa: F401  (registers the operators)
from sagellm import LLM, SamplingParams
from sagellm.operators.encode import EncodeOperator
from sagellm.operators.engine import _media
from sagellm.runtime.models.architectures.vision_weights import vision_weight_shapes
from sagellm.runtime.models.loaded import ModelLoadError
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import OperatorContext
from tests.tiny_models import make_tiny_llama
from tests.tiny_vision_models import IMAGE_TOKEN, make_tiny_idefics3

TOKENS = 6
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
PROMPT = f"User:{IMAGE_TOKEN}what is it?<end_of_utterance>\nAssistant:"


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


WIDE, TALL = png(40, 30, 0), png(20, 41, 1)  # 2 x 2 tiles and the whole image; 2 x 1 and the whole image


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory) -> Path:
    return make_tiny_idefics3(tmp_path_factory.mktemp("smolvlm") / "smolvlm", smolvlm=True)


@pytest.fixture(scope="module")
def encoder(smolvlm) -> EncodeOperator:
    operator = EncodeOperator(max_batch=4)
    operator.open(OperatorContext("encode", graph_attrs={"model": str(smolvlm)}))
    return operator


def test_an_engine_given_the_encode_nodes_output_encodes_nothing_and_gives_the_same_tokens(smolvlm, encoder):
    requests = [Request(request_id=f"r{i}", prompt=PROMPT, images=[image]) for i, image in enumerate((WIDE, TALL))]
    for request in requests:
        assert encoder.add(request) == []
    plain = Request(request_id="text", prompt="User: hello<end_of_utterance>\nAssistant:")
    assert encoder.add(plain) == [plain] and encoder.has_work()  # no images: passed on at once
    encoded = encoder.step()
    assert [r.request_id for r in encoded] == ["r0", "r1"] and not encoder.has_work()
    assert [len(r.encoded_images) for r in encoded] == [5, 3] and all(r.images is None for r in encoded)
    llm = LLM(str(smolvlm), max_num_seqs=2, num_kv_blocks=64, enable_prefix_caching=False)
    given = llm.generate([{"prompt_token_ids": r.prompt_token_ids, "multi_modal_data": _media(r)} for r in encoded],
                         GREEDY)  # fmt: skip
    assert llm.engine.runner.encoder.misses == 0  # the pictures came encoded
    images = [Image.open(io.BytesIO(data)) for data in (WIDE, TALL)]
    own = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": [image]}} for image in images], GREEDY)
    assert llm.engine.runner.encoder.misses == 8  # its own encoder, once a picture
    assert [o.outputs[0].token_ids for o in given] == [o.outputs[0].token_ids for o in own]
    assert [o.prompt_token_ids for o in given] == [o.prompt_token_ids for o in own]


def test_the_encode_node_does_not_encode_a_picture_it_encoded_before(encoder):
    """Its pictures are kept by hash as an engine's are: the same image in later requests (two in one step) takes
    its embeddings as they were."""
    first = Request(request_id="first", prompt=PROMPT, images=[png(30, 17, 7)])
    encoder.add(first)
    (done,) = encoder.step()
    misses, hits = encoder.encoder.misses, encoder.encoder.hits
    again = [Request(request_id=f"again{i}", prompt=PROMPT, images=[png(30, 17, 7)]) for i in range(2)]
    for request in again:
        encoder.add(request)
    repeated = encoder.step()
    pictures = len(done.encoded_images)  # its tiles and the whole image
    assert encoder.encoder.misses == misses and encoder.encoder.hits == hits + 2 * pictures  # none encoded again
    for request in repeated:
        pairs = zip(request.encoded_images, done.encoded_images, strict=True)
        assert all(torch.equal(a.embeds, b.embeds) for a, b in pairs)


def test_a_request_whose_image_does_not_decode_fails_alone(encoder):
    good = Request(request_id="good", prompt=PROMPT, images=[TALL])
    bad = Request(request_id="bad", prompt=PROMPT, images=[b"\x89PNG not really"])
    unpaired = Request(request_id="unpaired", prompt="no placeholder here", images=[TALL])
    for request in (good, bad, unpaired):
        encoder.add(request)
    out = {item.request_id: item for item in encoder.step()}
    assert isinstance(out["good"], Request) and out["good"].encoded_images
    assert isinstance(out["bad"], RequestError) and out["bad"].code == "invalid_request"
    assert isinstance(out["unpaired"], RequestError) and "placeholder" in out["unpaired"].message


def test_the_encode_node_reads_the_vision_encoders_weights_alone(smolvlm, tmp_path):
    loaded = load_model(smolvlm, encoders_only=True)
    assert set(loaded.weights) == set(vision_weight_shapes(loaded.config.vision))
    with pytest.raises(ModelLoadError, match="has no vision or audio encoder"):
        load_model(make_tiny_llama(tmp_path / "llama"), encoders_only=True)
