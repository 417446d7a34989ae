"""The model a benchmark runs: the default model (or any the engine can load), or a tiny random Llama."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.model_loader import LoadedModel, load_model

if TYPE_CHECKING:
    from configs import EngineConfig
    from engine import AsyncBatonEngine

TINY = "tiny"


def load(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """`tiny` builds an in-process random Llama (no files); anything else goes through the engine's loader."""
    if name == TINY:
        return tiny_llama()
    return load_model(name, dtype=dtype, device=device)


# Each turn between t3 (start) and t4 (end), the assistant's cue t5: words of the tiny vocabulary, so chat
# requests tokenize to real ids (content in the same "t<id>" words; any other word is the unknown t0).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                      "{% if add_generation_prompt %}t5{% endif %}")


def tiny_llama(seed: int = 0) -> LoadedModel:
    """A tiny randomly initialised Llama (float32) with a word-level tokenizer and a chat template: no files, no
    downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 512
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", bos_token="t2")
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, dtype=torch.float32, device=torch.device("cpu"), name=TINY)


def tiny_engine_front(config: EngineConfig) -> AsyncBatonEngine:
    """A front factory for `deployments.builder.make_app`: the BATON engine over `tiny_llama()` (the same weights
    the plain baseline loads for `tiny`), built on the replica."""
    from engine import AsyncBatonEngine, BatonEngine

    return AsyncBatonEngine(build=lambda: BatonEngine(config, loaded=tiny_llama()))
