"""An audio encoder's tensors: the shapes an AudioConfig implies, which the loaders check the kept tensors against.
Qwen2-Audio checkpoints name the tower `audio_tower.` and the projector `multi_modal_projector.linear.` (as
transformers 4 and 5 both save them; `model.` before either is dropped), which are the graph's names."""

from __future__ import annotations

from sagellm.runtime.models.audio_config import AudioConfig

AUDIO_TOWER, AUDIO_PROJECTOR = "audio_tower.", "multi_modal_projector."
AUDIO_PREFIXES = ("model.audio_tower.", AUDIO_TOWER, "model.multi_modal_projector.", AUDIO_PROJECTOR)


def audio_name(name: str) -> str:
    """The graph's name of a tower or projector tensor (one starting with an AUDIO_PREFIXES entry)."""
    return name.removeprefix("model.")


def audio_weight_shapes(audio: AudioConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the audio encoder graph reads for `audio`, under the graph's names."""
    d, inner, t = audio.hidden_size, audio.intermediate_size, AUDIO_TOWER
    shapes: dict[str, tuple[int, ...]] = {
        t + "conv1.weight": (d, audio.num_mel_bins, 3),
        t + "conv1.bias": (d,),
        t + "conv2.weight": (d, d, 3),
        t + "conv2.bias": (d,),
        t + "embed_positions.weight": (audio.max_source_positions, d),
        t + "layer_norm.weight": (d,),
        t + "layer_norm.bias": (d,),
        AUDIO_PROJECTOR + "linear.weight": (audio.text_hidden_size, d),
        AUDIO_PROJECTOR + "linear.bias": (audio.text_hidden_size,),
    }
    for i in range(audio.num_layers):
        p = f"{t}layers.{i}."
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)}
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{projection}.weight"] = (d, d)
            if projection != "k_proj":  # Whisper's key projection has no bias
                shapes[f"{p}self_attn.{projection}.bias"] = (d,)
        shapes |= {f"{p}fc1.weight": (inner, d), f"{p}fc1.bias": (inner,)}
        shapes |= {f"{p}fc2.weight": (d, inner), f"{p}fc2.bias": (d,)}
    return shapes
