"""`CamexConfig`: the configuration of a camex_ds decoder exported to Hugging Face (model_type `camex`).

Written by `camex-convert export-hf`; `modeling_camex.py` reads it. It holds what inference needs. The training
options that inference does not use (router noise, load-balancing loss, DARE's drop rate, the curvature's learning
rate, ...) are kept whole in `camex_ds_config`, the model's camex_ds config, so that `camex-convert import-hf`
rebuilds the trainable model exactly; the modeling code never reads that key.
"""
from transformers import PretrainedConfig


class CamexConfig(PretrainedConfig):
    """A decoder of the `gpt` family (LayerNorm, learned positions) or the `llama` family (RMSNorm, rotary
    positions, grouped-query attention), whose FFN in the layers `moe_layers` is a MoE layer of `method`.

    Merge layers (camex_ds spec §2-§4; euclid, ties, dare, camex, camex-ties, camex-dare) merge `num_experts`
    routed experts per segment of `segment_len` tokens with top-`router_top_k` softmax gates under causal routing,
    scaled by `alpha` (`routing` and `first_segment`: §2's other routings, whose gates see a segment's own tokens).
    With `dynamic`, consecutive merge layers form chains; `chain_starts[i]` tells whether the i-th MoE layer starts
    one (owns a base). `smoe` layers route each token to its top-`router_top_k` experts.
    """

    model_type = "camex"

    def __init__(self, architecture="gpt", vocab_size=32000, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, intermediate_size=512, max_position_embeddings=256,
                 activation="gelu", bias="none", norm_eps=1e-5, rotary_base=10000.0, rotary_scaling=None,
                 tie_word_embeddings=True, method=None, moe_layers=(), chain_starts=(), num_experts=0, router_top_k=0,
                 segment_len=1, routing="causal", first_segment="uniform", alpha=1.0,
                 dynamic=False, curvature_rank=1, camex_ds_config=None, **kwargs):
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.activation = activation  # gelu (exact erf), gelu_tanh (GPT-2's) or swiglu
        self.bias = bias  # none, qkv (Qwen2's q/k/v biases) or all (every linear layer, GPT-2)
        self.norm_eps = norm_eps
        self.rotary_base = rotary_base  # llama family: the rotary base theta
        self.rotary_scaling = rotary_scaling  # llama family: Llama 3's frequency scaling, or None
        self.method = method  # None: a dense model
        self.moe_layers = list(moe_layers)
        self.chain_starts = list(chain_starts)
        self.num_experts = num_experts  # routed experts per merge layer (a dynamic layer's base is not routed)
        self.router_top_k = router_top_k
        self.segment_len = segment_len
        self.routing = routing  # causal, segment or sequence (one segment: the whole input)
        self.first_segment = first_segment  # causal routing's segment 0: uniform gates, or its own (self-detached)
        self.alpha = alpha
        self.dynamic = dynamic
        self.curvature_rank = curvature_rank
        self.camex_ds_config = camex_ds_config
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
