"""Configuration of a scaleinv_dist GPT exported for Hugging Face transformers (remote code).

Standalone: imports only transformers. Written by scaleinv_dist/export_hf.py.
"""
from transformers import PretrainedConfig


class ScaleInvConfig(PretrainedConfig):
    """GPT with RMSNorm, QK-norm, squared-ReLU MLP, untied head and a positional scheme / logit
    transform from "Scale-invariant attention" (Anson, Wang, Aitchison 2025).

    position: rope | p_rope | nope | alibi.  transform: scale_invariant | none | logn.
    """

    model_type = "scaleinv_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 1024,
        position: str = "p_rope",
        transform: str = "scale_invariant",
        tau: float = 10.0,
        rope_base: float = 10000.0,
        p_rope_base: float = 1024.0,
        p_rope_fraction: float = 0.5,
        train_seq_len: int = 256,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.position = position
        self.transform = transform
        self.tau = tau
        self.rope_base = rope_base
        self.p_rope_base = p_rope_base
        self.p_rope_fraction = p_rope_fraction
        self.train_seq_len = train_seq_len
        # no learned positions: this is only a hint for tools (the model runs at any length)
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
