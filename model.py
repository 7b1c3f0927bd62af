"""XDBERT's models in plain PyTorch (Hsu, Lee and Tsao, ACL 2022).

The cross-modal transformer of Sec. 2.1 / Fig. 2 is three parts:
  - LanguageEncoder: BERT or ELECTRA (post-LN, GELU), the model that is adapted and then finetuned ("XDBERT");
  - CLIPTextTransformer: CLIP's text tower "CLIP-T" (pre-LN, causal, quick-GELU, text projection);
  - CrossModalLayer x 2: LXMERT-style layers coupling the two streams with Eq. 1 in both directions (Fig. 3).
CrossModalTransformer adds the three adaptation heads and losses of Sec. 2.3 (MLM, MATCH, CLIPTC).
The rest of the file loads the public Hugging Face checkpoints through explicit name tables (from_hf), writes the
adapted encoder back in their layout (save_hf), and `python model.py` prints the Table 6 parameter counts.
"""
import contextlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- configs (Table 4, spec section 2)

@dataclass
class EncoderConfig:
    """A BERT-family language encoder. embedding_size != hidden_size adds ELECTRA-small's projection."""
    model_type: str = "bert"  # "bert" | "electra"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    embedding_size: int | None = None
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pooler: bool = True
    initializer_range: float = 0.02  # std of new weights (config.json's initializer_range)


@dataclass
class CLIPTextConfig:
    """CLIP-T, the text tower of CLIP ViT-B/32: 77 positions, causal self-attention, 512-wide projection."""
    vocab_size: int = 49408
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    ffn_size: int = 2048
    context_length: int = 77
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5


_LARGE = dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096)
PRESETS = {
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(**_LARGE),
    "electra-base": EncoderConfig(model_type="electra", pooler=False),
    "electra-large": EncoderConfig(model_type="electra", pooler=False, **_LARGE),
    "clip": CLIPTextConfig(),
    # tiny models for the tests and the offline toy kit (download.py sets vocab_size to its trained tokenizers)
    "bert-toy": EncoderConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128,
                              max_positions=128),
    "electra-toy": EncoderConfig(model_type="electra", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                                 ffn_size=128, max_positions=128, embedding_size=32, pooler=False),
    "clip-toy": CLIPTextConfig(vocab_size=1024, width=48, num_layers=2, num_heads=4, ffn_size=96,
                               projection_dim=32),
}


# ----------------------------------------------------------------------------- building blocks

class Attention(nn.Module):
    """Eq. 1: softmax(Q K^T / sqrt(D)) V. Self-attention when kv_dim is None, else cross-attention: Q from this
    stream (width dim), K and V from the other stream (width kv_dim), all mapped into this stream's width (App. B)."""

    def __init__(self, dim, num_heads, kv_dim=None, dropout=0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        if kv_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None, causal=False):
        # x (B, T, D); context (B, S, D_kv) or None; mask (B, S) bool, True = a real key, or None
        B, T, D = x.shape
        if context is None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(context).split(D, dim=-1)
        q, k, v = (t.view(B, -1, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        mask = None if mask is None else mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, heads, T, D/heads) -> (B, T, D)


class PostLNAttention(nn.Module):
    """BERT's attention sublayer: attention, dense, dropout, residual, LayerNorm (also LXMERT's cross-attention)."""

    def __init__(self, dim, num_heads, eps, dropout, kv_dim=None):
        super().__init__()
        self.attn = Attention(dim, num_heads, kv_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, context=None, mask=None):
        return self.ln(x + self.drop(self.attn(x, context, mask)))


class PostLNFeedForward(nn.Module):
    """BERT's feed-forward sublayer: dense, GELU (erf), dense, dropout, residual, LayerNorm."""

    def __init__(self, dim, ffn_size, eps, dropout):
        super().__init__()
        self.fc = nn.Linear(dim, ffn_size)
        self.proj = nn.Linear(ffn_size, dim)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.ln(x + self.drop(self.proj(F.gelu(self.fc(x)))))


class Block(nn.Module):
    """One post-LN BERT / ELECTRA layer (a single-modality encoder layer of Fig. 3)."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = PostLNAttention(cfg.hidden_size, cfg.num_heads, cfg.layer_norm_eps, cfg.dropout)
        self.ffn = PostLNFeedForward(cfg.hidden_size, cfg.ffn_size, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, x, mask):
        return self.ffn(self.attention(x, mask=mask))


def _padding_mask(attention_mask):
    """(B, T) 0/1 -> bool (B, T). None means "nothing is padded": the caller decides that on the CPU batch (no wait
    for the device), and SDPA then picks its fastest kernel."""
    return None if attention_mask is None else attention_mask.bool()


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout; ELECTRA-small's projection when needed."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.embedding_size or cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, dim)
        self.position_embeddings = nn.Embedding(cfg.max_positions, dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, dim)
        self.ln = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.project = nn.Linear(dim, cfg.hidden_size) if dim != cfg.hidden_size else None

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:T] + \
            self.token_type_embeddings(token_type_ids)
        x = self.drop(self.ln(x))
        return x if self.project is None else self.project(x)


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the [CLS] vector."""

    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, H) -> (B, H)


class LanguageEncoder(nn.Module):
    """BERT or ELECTRA (Sec. 2.1, Table 4): the model adapted by XDBERT and finetuned alone afterwards."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.pooler = Pooler(cfg.hidden_size) if cfg.pooler else None
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        # input_ids (B, T), attention_mask (B, T) 0/1 or None (no padding) -> hidden (B, T, H), pooled (B, H) or None
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = _padding_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.pooler(x) if self.pooler is not None else None)


class ResidualAttentionBlock(nn.Module):
    """One pre-LN CLIP-T layer: x + attn(ln_1(x)) with a causal mask, then x + mlp(ln_2(x)) with quick-GELU."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.width, cfg.ffn_size)
        self.proj = nn.Linear(cfg.ffn_size, cfg.width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), causal=True)
        h = self.fc(self.ln_2(x))
        return x + self.proj(h * torch.sigmoid(1.702 * h))  # quick-GELU


class CLIPTextTransformer(nn.Module):
    """CLIP-T (Sec. 2.2, App. B): token + position embeddings, causal pre-LN layers, final LN, text projection."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.positional_embedding, std=0.01)  # CLIP's own initialisation of these two
        nn.init.normal_(self.text_projection.weight, std=cfg.width ** -0.5)

    def forward(self, input_ids):
        # input_ids (N, 77) -> tokens (N, 77, P) for every position, pooled (N, P) at the end-of-text token.
        # Padding after <|endoftext|> needs no mask: the causal mask keeps it out of every real position.
        x = self.token_embedding(input_ids) + self.positional_embedding[:input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        tokens = self.text_projection(self.ln_final(x))
        pooled = tokens[torch.arange(len(tokens), device=tokens.device), input_ids.argmax(dim=-1)]
        return tokens, pooled


def init_weights(module, std=0.02):
    """BERT's initialisation: normal(0, std) weights (the config's initializer_range, 0.02 in every public
    checkpoint), zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- the cross-modal encoder (Fig. 3)

class CrossModalLayer(nn.Module):
    """One LXMERT-style cross-modal encoder layer (Sec. 2.1, Fig. 3, spec section 3).

    lang (B, T, H) is BERT's stream; vis (B, n*77, P) is CLIP-T's projected stream ("visual" features, Sec. 2.2).
    1. cross-attention both ways (Eq. 1 with Q from one stream, K and V from the other), both read the layer inputs;
    2. self-attention in each stream; 3. feed-forward in each stream. Every sublayer is post-LN with a residual.
    The CLIP stream keeps its own width P and heads but uses the language encoder's FFN size (Table 6).
    """

    def __init__(self, lang: EncoderConfig, clip: CLIPTextConfig):
        super().__init__()
        H, P, eps, p = lang.hidden_size, clip.projection_dim, lang.layer_norm_eps, lang.dropout
        self.lang_cross = PostLNAttention(H, lang.num_heads, eps, p, kv_dim=P)
        self.vis_cross = PostLNAttention(P, clip.num_heads, eps, p, kv_dim=H)
        self.lang_self = PostLNAttention(H, lang.num_heads, eps, p)
        self.vis_self = PostLNAttention(P, clip.num_heads, eps, p)
        self.lang_ffn = PostLNFeedForward(H, lang.ffn_size, eps, p)
        self.vis_ffn = PostLNFeedForward(P, lang.ffn_size, eps, p)

    def forward(self, lang, vis, lang_mask, vis_mask):
        lang, vis = self.lang_cross(lang, vis, vis_mask), self.vis_cross(vis, lang, lang_mask)
        lang, vis = self.lang_self(lang, mask=lang_mask), self.vis_self(vis, mask=vis_mask)
        return self.lang_ffn(lang), self.vis_ffn(vis)


class TokenPredictionHead(nn.Module):
    """BERT's MLM head (dense, GELU, LayerNorm, decoder tied to an embedding matrix, own bias); used for the joint
    MLM on the language stream and for CLIPTC on the CLIP stream with CLIP's token embedding (Sec. 2.3.1, 2.3.3)."""

    def __init__(self, dim, embedding_dim, vocab_size, eps):
        super().__init__()
        self.dense = nn.Linear(dim, embedding_dim)
        self.ln = nn.LayerNorm(embedding_dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x, embedding_weight):
        # x (N, D) -> logits (N, V); embedding_weight (V, E) is the tied decoder
        return F.linear(self.ln(F.gelu(self.dense(x))), embedding_weight, self.bias)


def token_loss(head, hidden, positions, targets, embedding_weight):
    """Cross-entropy at K chosen positions per sequence, averaged over the real targets (-100: an unused slot). Only
    those rows reach the vocabulary-sized decoder, in static shapes: hidden (B, L, D) gathered at positions (B, K)
    -> (B, K, D) -> logits (B, K, V). Returns 0 (with a graph) when no target is real."""
    chosen = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, D)
    logits = head(chosen, embedding_weight).float().flatten(0, 1)  # (B*K, V)
    return F.cross_entropy(logits, targets.flatten(), reduction="sum") / (targets != -100).sum().clamp(min=1)


TASKS = ("mlm", "match", "cliptc")


class CrossModalTransformer(nn.Module):
    """The adaptation model (Sec. 2.1, 2.3): language encoder + CLIP-T + cross-modal layers + the task heads.

    The loss is the plain sum of the chosen tasks' cross-entropies (Table 3 ablations choose any subset):
      MLM    masked tokens predicted from the language stream, decoder tied to the word embeddings;
      MATCH  same-sentence prediction, a binary classifier on the pooled cross-modal [CLS];
      CLIPTC CLIP token classification, 15% of CLIP tokens predicted from the CLIP stream (input unchanged).
    clip_cfg=None with xlayers=0 is the fair baseline of Sec. 3: the language encoder alone with plain MLM.
    """

    def __init__(self, lang_cfg: EncoderConfig, clip_cfg: CLIPTextConfig | None, xlayers=2, tasks=TASKS):
        super().__init__()
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown adaptation task(s) {sorted(unknown)}: choose from {', '.join(TASKS)}")
        if clip_cfg is None and (xlayers or set(tasks) - {"mlm"}):
            raise ValueError("without CLIP-T only the plain MLM baseline exists: use xlayers=0 and tasks=('mlm',)")
        self.tasks = tuple(t for t in TASKS if t in tasks)
        self.language = LanguageEncoder(lang_cfg)
        if self.language.pooler is not None:
            self.language.pooler.requires_grad_(False)  # adaptation never uses it; XDBERT keeps BERT's pooler
        self.clip = CLIPTextTransformer(clip_cfg) if clip_cfg is not None else None
        self.xlayers = nn.ModuleList(CrossModalLayer(lang_cfg, clip_cfg) for _ in range(xlayers))
        H, eps = lang_cfg.hidden_size, lang_cfg.layer_norm_eps
        if "mlm" in self.tasks:
            E = lang_cfg.embedding_size or H
            self.mlm_head = TokenPredictionHead(H, E, lang_cfg.vocab_size, eps)
        if "match" in self.tasks:
            self.match_pooler = Pooler(H)
            self.match_classifier = nn.Linear(H, 2)
        if "cliptc" in self.tasks:
            self.cliptc_head = TokenPredictionHead(clip_cfg.projection_dim, clip_cfg.width, clip_cfg.vocab_size, eps)
        for name, module in self.named_children():
            if name not in ("language", "clip"):  # new layers start as LXMERT's: the language config's std
                module.apply(lambda m: init_weights(m, lang_cfg.initializer_range))

    def encode(self, input_ids, attention_mask, token_type_ids, clip_ids, clip_mask, clip_blocks=None):
        """Both encoders, then the cross-modal layers. Returns lang (B, T, H) and vis (B, n*77, P) or None.
        attention_mask None: no padding. clip_blocks (N,): the blocks of the flattened (B*n) CLIP-T runs on (all when
        None); the others are all padding and enter the cross-modal layers as zeros, masked out like any padding."""
        lang, _ = self.language(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        if self.clip is None:
            return lang, None
        B, n, C = clip_ids.shape
        blocks = clip_ids.reshape(B * n, C)  # (B, n, 77) -> (B*n, 77)
        vis, _ = self.clip(blocks if clip_blocks is None else blocks[clip_blocks])  # (B*n or N, 77) -> (.., 77, P)
        if clip_blocks is not None:  # (N, 77, P) -> (B*n, 77, P), the skipped blocks as zeros
            vis = vis.new_zeros(B * n, C, vis.shape[-1]).index_copy(0, clip_blocks, vis)
        vis = vis.reshape(B, n * C, -1)  # -> (B, n*77, P), e.g. (B, 693, 512)
        lang_mask, vis_mask = _padding_mask(attention_mask), _padding_mask(clip_mask.reshape(B, n * C))
        for layer in self.xlayers:
            lang, vis = layer(lang, vis, lang_mask, vis_mask)
        return lang, vis

    def pooled(self, lang):
        """The cross-modal [CLS] pooler that MATCH classifies (and full-model finetuning uses, App. C.3)."""
        return self.match_pooler(lang)

    def forward(self, input_ids, attention_mask=None, clip_ids=None, clip_mask=None, token_type_ids=None,
                clip_blocks=None, mlm_positions=None, mlm_targets=None, match_labels=None, cliptc_positions=None,
                cliptc_targets=None):
        """A batch of data.AdaptationData -> {task: loss, "match_acc", "loss"}; MLM and CLIPTC are predicted at
        mlm_positions (B, K) of the T language positions and cliptc_positions (B, K') of the n*77 CLIP positions."""
        lang, vis = self.encode(input_ids, attention_mask, token_type_ids, clip_ids, clip_mask, clip_blocks)
        out = {}
        if "mlm" in self.tasks:
            out["mlm"] = token_loss(self.mlm_head, lang, mlm_positions, mlm_targets,
                                    self.language.embeddings.word_embeddings.weight)
        if "match" in self.tasks:
            logits = self.match_classifier(self.pooled(lang))  # (B, 2)
            out["match"] = F.cross_entropy(logits.float(), match_labels)
            out["match_acc"] = (logits.argmax(-1) == match_labels).float().mean().detach()
        if "cliptc" in self.tasks:
            out["cliptc"] = token_loss(self.cliptc_head, vis, cliptc_positions, cliptc_targets,
                                       self.clip.token_embedding.weight)
        out["loss"] = sum(out[t] for t in self.tasks)
        return out


def count_parameters(module):
    """Number of scalars in a module's parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- safetensors, hand-written

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file: 8-byte little-endian header length N, N bytes of JSON, then raw tensor bytes."""
    data = bytearray(os.path.getsize(path))
    with open(path, "rb") as f:
        f.readinto(data)
    bad, redo = f"{path} is not a complete safetensors file", _redownload(os.path.dirname(os.path.abspath(path)))
    if len(data) < 8:
        raise ValueError(f"{bad} ({len(data)} bytes): {redo}")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{bad} (its header is unreadable): {redo}") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end > len(body) or end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"{bad}: tensor {name} lies past its end ({end} > {len(body)} bytes of data); "
                             f"{redo}")
        flat = torch.frombuffer(body[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(tensors, path, metadata=None):
    """Write tensors as .safetensors (header padded to 8 bytes), atomically."""
    codes = {v: k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)


class atomic_file:
    """open(path, mode) whose file only appears under its name once fully written and fsynced (temporary sibling
    `<name>.<pid>.XXXX.tmp` + os.replace); text modes write UTF-8 with '\\n' line endings."""

    def __init__(self, path, mode="wb"):
        self.path, self.mode = path, mode

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(self.path), suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # the permissions open() would give, not mkstemp's 0600
        text = "b" not in self.mode
        self.file = os.fdopen(fd, self.mode, **({"encoding": "utf-8", "newline": ""} if text else {}))
        return self.file

    def __exit__(self, kind, *_):
        if kind is None:
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        else:
            os.remove(self.tmp)


def _tmp_prefix(path):
    return f"{os.path.basename(os.path.normpath(path))}.{os.getpid()}."


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file under `path`."""
    with atomic_file(path) as f:
        torch.save(obj, f)


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary sibling folder to fill; on success it replaces `path`. An existing folder is first moved
    aside (`<name>.<pid>.old`) and removed last, so a complete copy exists at every moment; sweep_stale puts an
    aside copy back if a kill struck between the two renames."""
    path = os.path.normpath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        aside = f"{path}.{os.getpid()}.old"
        if os.path.exists(path):
            os.replace(path, aside)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_stale(folder):
    """Remove the temporary files and folders (`<name>.<pid>.XXXX.tmp`) that killed processes left in `folder`, and
    put back a folder that atomic_dir had moved aside (`<name>.<pid>.old`) when nothing replaced it. Entries of live
    processes are left alone. Returns the entries handled."""
    handled = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        match = re.fullmatch(r"(.+)\.(\d+)\.(\w+\.tmp|old)", entry)
        if not match or int(match[2]) == os.getpid() or _alive(int(match[2])):
            continue
        full, name = os.path.join(folder, entry), os.path.join(folder, match[1])
        if match[3] == "old" and not os.path.exists(name):
            os.replace(full, name)
        elif os.path.isdir(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
        handled.append(entry)
    return handled


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- Hugging Face checkpoints

def encoder_names(cfg: EncoderConfig):
    """Our parameter name -> the Hugging Face BertModel / ElectraModel names it is made of (concatenated on dim 0).
    Checkpoints may prefix these with "bert." or "electra."; bert-base-uncased still calls LayerNorm weights
    gamma/beta (read_checkpoint renames them)."""
    table = {"embeddings.word_embeddings.weight": ["embeddings.word_embeddings.weight"],
             "embeddings.position_embeddings.weight": ["embeddings.position_embeddings.weight"],
             "embeddings.token_type_embeddings.weight": ["embeddings.token_type_embeddings.weight"]}
    pairs = [("embeddings.ln", "embeddings.LayerNorm")]
    if (cfg.embedding_size or cfg.hidden_size) != cfg.hidden_size:
        pairs.append(("embeddings.project", "embeddings_project"))
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            table[ours + f"attention.attn.qkv.{suffix}"] = [hf + f"attention.self.{m}.{suffix}"
                                                            for m in ("query", "key", "value")]
        pairs += [(ours + "attention.attn.proj", hf + "attention.output.dense"),
                  (ours + "attention.ln", hf + "attention.output.LayerNorm"),
                  (ours + "ffn.fc", hf + "intermediate.dense"),
                  (ours + "ffn.proj", hf + "output.dense"),
                  (ours + "ffn.ln", hf + "output.LayerNorm")]
    if cfg.pooler:
        pairs.append(("pooler.dense", "pooler.dense"))
    for ours, hf in pairs:
        for suffix in ("weight", "bias"):
            table[f"{ours}.{suffix}"] = [f"{hf}.{suffix}"]
    return table


# BERT's pretraining heads, where a checkpoint has them: the MLM and MATCH heads start from them (Sec. 2.3).
PRETRAINING_HEAD_NAMES = {
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.bias": "cls.predictions.bias",
    "match_classifier.weight": "cls.seq_relationship.weight",
    "match_classifier.bias": "cls.seq_relationship.bias",
}


def clip_names(cfg: CLIPTextConfig):
    """Our parameter name -> the Hugging Face CLIPModel / CLIPTextModelWithProjection names it is made of."""
    table = {"token_embedding.weight": ["text_model.embeddings.token_embedding.weight"],
             "positional_embedding": ["text_model.embeddings.position_embedding.weight"],
             "text_projection.weight": ["text_projection.weight"]}
    pairs = [("ln_final", "text_model.final_layer_norm")]
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"text_model.encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            table[ours + f"attn.qkv.{suffix}"] = [hf + f"self_attn.{m}_proj.{suffix}" for m in "qkv"]
        pairs += [(ours + "attn.proj", hf + "self_attn.out_proj"), (ours + "ln_1", hf + "layer_norm1"),
                  (ours + "fc", hf + "mlp.fc1"), (ours + "proj", hf + "mlp.fc2"), (ours + "ln_2", hf + "layer_norm2")]
    for ours, hf in pairs:
        for suffix in ("weight", "bias"):
            table[f"{ours}.{suffix}"] = [f"{hf}.{suffix}"]
    return table


def _unused(name, cfg):
    """Checkpoint tensors that are known and deliberately left out."""
    if name.endswith("position_ids") or name.startswith(("vision_model.", "visual_projection.")):
        return True  # buffers of old transformers versions; CLIP's image tower
    if name in ("logit_scale", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        return True  # CLIP's contrastive temperature (unused here); the MLM decoder is tied to the word embeddings
    if name.startswith(("embeddings_project.", "discriminator_predictions.")):
        return True  # ELECTRA's unused projection when embedding_size == hidden_size (HF#7530); its RTD head
    return False


def _redownload(path):
    return f"fetch it again with `python download.py {os.path.basename(os.path.normpath(path))} --force`"


def config_from_hf(path):
    """config.json of a hub-layout directory -> (our config, kind: "bert" | "electra" | "clip")."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}: is it a checkpoint directory? "
                                f"Fetch one with `python download.py bert-base` (or clip, electra-base, ...)")
    try:
        with open(file, encoding="utf-8") as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): {_redownload(path)}") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file} is not a config.json object: {_redownload(path)}")
    try:
        return _config(c, file)
    except KeyError as e:
        raise ValueError(f"{file} lacks the key {e.args[0]!r} of a {c.get('model_type')} config: "
                         f"{_redownload(path)}") from None


def _config(c, file):
    kind = c.get("model_type")
    if kind in ("bert", "electra"):
        act = c.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{file}: hidden_act {act!r} is not supported (BERT and ELECTRA use 'gelu')")
        emb = c.get("embedding_size", c["hidden_size"])
        return EncoderConfig(
            model_type=kind, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"], ffn_size=c["intermediate_size"],
            max_positions=c["max_position_embeddings"], type_vocab_size=c.get("type_vocab_size", 2),
            embedding_size=None if emb == c["hidden_size"] else emb, layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            dropout=c.get("hidden_dropout_prob", 0.1), pooler=kind == "bert",
            initializer_range=c.get("initializer_range", 0.02)), kind
    if kind in ("clip", "clip_text_model"):
        t = (c.get("text_config") or {}) if kind == "clip" else c
        d = CLIPTextConfig()
        return CLIPTextConfig(
            vocab_size=t.get("vocab_size", d.vocab_size), width=t.get("hidden_size", d.width),
            num_layers=t.get("num_hidden_layers", d.num_layers), num_heads=t.get("num_attention_heads", d.num_heads),
            ffn_size=t.get("intermediate_size", d.ffn_size),
            context_length=t.get("max_position_embeddings", d.context_length),
            projection_dim=c.get("projection_dim", t.get("projection_dim", d.projection_dim)),
            layer_norm_eps=t.get("layer_norm_eps", d.layer_norm_eps)), "clip"
    raise ValueError(f"{file}: model_type {kind!r} is not one of bert, electra, clip")


def read_checkpoint(path):
    """All tensors of a hub-layout directory (model.safetensors, else pytorch_model.bin), with the model prefix
    ("bert.", "electra.") dropped and gamma/beta renamed to weight/bias."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            break
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}: the download is incomplete, "
                                f"{_redownload(path)}")
    if file.endswith(".bin"):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{file} cannot be read ({e}): {_redownload(path)}") from None
    else:
        state = read_safetensors(file)
    out = {}
    for key, tensor in state.items():
        for prefix in ("bert.", "electra."):
            key = key.removeprefix(prefix)
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = tensor
    return out


def _convert(state, table, cfg, source):
    """Fill our tensors from a checkpoint by the name table; every name of ours must be found with its shape and
    every checkpoint tensor must be used or known-unused (_unused)."""
    ours, used = {}, set()
    for name, parts in table.items():
        missing = [p for p in parts if p not in state]
        if missing:
            raise ValueError(f"{source} has no tensor {missing[0]} (needed for {name}): is it a "
                             f"{getattr(cfg, 'model_type', 'clip')} checkpoint of the layout config.json describes?")
        ours[name] = torch.cat([state[p] for p in parts]) if len(parts) > 1 else state[parts[0]]
        used.update(parts)
    extra = [k for k in state if k not in used and not _unused(k, cfg) and k not in PRETRAINING_HEAD_NAMES.values()]
    if extra:
        raise ValueError(f"{source} holds tensors this architecture does not have, e.g. {extra[0]}: "
                         f"it is not a plain {getattr(cfg, 'model_type', 'clip')} checkpoint")
    return ours


def _load_strict(module, tensors, source):
    """load_state_dict with a clear error naming the first misshaped tensor."""
    expected = module.state_dict()
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor for {name} has shape {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(expected[name].shape)}")
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def from_hf(path):
    """Build a LanguageEncoder (model_type bert / electra) or CLIPTextTransformer (clip, clip_text_model) from a
    directory in the Hugging Face hub layout: config.json + model.safetensors or pytorch_model.bin."""
    return _from_hf(path)[0]


def _from_hf(path):
    cfg, kind = config_from_hf(path)
    state = read_checkpoint(path)
    if kind == "clip":
        module, table = CLIPTextTransformer(cfg), clip_names(cfg)
    else:
        module, table = LanguageEncoder(cfg), encoder_names(cfg)
    _load_strict(module, _convert(state, table, cfg, path), path)
    heads = {ours: state[hf] for ours, hf in PRETRAINING_HEAD_NAMES.items() if hf in state}
    return module, heads


def load_crossmodal_from_hf(lang_dir, clip_dir, xlayers=2, tasks=TASKS):
    """The adaptation model from two public checkpoints (clip_dir=None: the MLM-only baseline). The cross-modal
    layers and the CLIPTC head start fresh; the MLM head and MATCH classifier start from BERT's pretraining heads
    (cls.predictions, cls.seq_relationship) when the checkpoint has them, and the MATCH pooler from BERT's pooler.
    NSP's class 0 is IsNext (the positive pair) and ours is 1 ("same text"), so the NSP rows are swapped."""
    language, heads = _from_hf(lang_dir)
    if not isinstance(language, LanguageEncoder):
        raise ValueError(f"{lang_dir} holds a CLIP checkpoint; the language encoder must be BERT or ELECTRA")
    clip = from_hf(clip_dir) if clip_dir is not None else None
    if clip is not None and not isinstance(clip, CLIPTextTransformer):
        raise ValueError(f"{clip_dir} is not a CLIP checkpoint (its config.json model_type must be clip)")
    model = CrossModalTransformer(language.config, clip.config if clip else None, xlayers, tasks)
    model.language.load_state_dict(language.state_dict())
    if clip is not None:
        model.clip.load_state_dict(clip.state_dict())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in heads.items():
            if name in params:  # the head of a chosen task
                params[name].copy_(tensor[[1, 0]] if name.startswith("match_classifier.") else tensor)
    if "match" in model.tasks and language.pooler is not None:
        model.match_pooler.load_state_dict(language.pooler.state_dict())
    return model


def _hf_config(cfg):
    """Our config -> a config.json that transformers' BertModel / ElectraModel / CLIPTextModelWithProjection read."""
    if isinstance(cfg, CLIPTextConfig):
        return {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"],
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_size,
                "max_position_embeddings": cfg.context_length, "projection_dim": cfg.projection_dim,
                "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "quick_gelu",
                "bos_token_id": cfg.vocab_size - 2, "eos_token_id": cfg.vocab_size - 1, "pad_token_id": 0}
    c = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "intermediate_size": cfg.ffn_size, "max_position_embeddings": cfg.max_positions,
         "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu",
         "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, "pad_token_id": 0,
         "initializer_range": cfg.initializer_range,
         "architectures": ["BertModel" if cfg.model_type == "bert" else "ElectraModel"]}
    if cfg.model_type == "electra":
        c["embedding_size"] = cfg.embedding_size or cfg.hidden_size
    return c


def save_hf(encoder, path):
    """Write a LanguageEncoder (e.g. XDBERT after adaptation) or CLIPTextTransformer in the hub layout:
    config.json + model.safetensors under the public names, so that transformers' from_pretrained loads it."""
    cfg = encoder.config
    table = clip_names(cfg) if isinstance(cfg, CLIPTextConfig) else encoder_names(cfg)
    state, tensors = encoder.state_dict(), {}
    for ours, parts in table.items():
        for hf, chunk in zip(parts, state[ours].chunk(len(parts))):
            tensors[hf] = chunk.clone()
    os.makedirs(path, exist_ok=True)
    write_safetensors(tensors, os.path.join(path, "model.safetensors"), {"format": "pt"})
    with atomic_file(os.path.join(path, "config.json")) as f:
        f.write(json.dumps(_hf_config(cfg), indent=2).encode())


def save_crossmodal(model, path):
    """The whole adapted cross-modal transformer in one file (for full-model finetuning, App. C.3)."""
    atomic_save({"lang_cfg": asdict(model.language.config),
                 "clip_cfg": asdict(model.clip.config) if model.clip is not None else None,
                 "xlayers": len(model.xlayers), "tasks": list(model.tasks), "model": model.state_dict()}, path)


def load_crossmodal(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cross-modal model at {path}: run adapt.py first, it writes crossmodal.pt")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    clip_cfg = CLIPTextConfig(**blob["clip_cfg"]) if blob["clip_cfg"] else None
    model = CrossModalTransformer(EncoderConfig(**blob["lang_cfg"]), clip_cfg, blob["xlayers"], blob["tasks"])
    model.load_state_dict(blob["model"])
    return model


# ----------------------------------------------------------------------------- Table 6, and the speed benchmark

PAPER_TABLE6 = {"BERT-b": 109_482_240, "XBERT-b": 202_059_009, "ELECTRA-l": 334_092_288, "XELECTRA-l": 442_671_617}


def table6():
    """Parameter counts of Table 6 from the presets, on the meta device (no weights needed). Task heads are not
    counted. CLIP's contrastive logit scale is not kept (nothing here uses it): the cross-modal rows add it as +1."""
    rows = []
    with torch.device("meta"):
        for name, preset in (("BERT-b", "bert-base"), ("ELECTRA-l", "electra-large")):
            x = CrossModalTransformer(PRESETS[preset], PRESETS["clip"], xlayers=2, tasks=())
            rows.append((name, count_parameters(x.language)))
            rows.append(("X" + name, count_parameters(x) + 1))
    return rows


def _bench_pair(preset, shape, directory):
    """Our module and transformers' (sdpa attention) with identical random weights, and an input batch."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    ours = LanguageEncoder(cfg) if preset != "clip" else CLIPTextTransformer(cfg)
    save_hf(ours, directory)
    if preset == "clip":
        theirs = transformers.CLIPTextModelWithProjection.from_pretrained(directory, attn_implementation="sdpa")
        run_theirs = lambda ids: theirs(ids).text_embeds
    else:
        theirs = transformers.BertModel.from_pretrained(directory, attn_implementation="sdpa")
        run_theirs = lambda ids: theirs(ids).last_hidden_state
    ours.train(), theirs.train()
    ids = torch.randint(0, cfg.vocab_size - 1, shape)
    return {"ours": lambda: ours(ids)[0], "transformers": lambda: run_theirs(ids)}


def _step(run):
    run().float().square().mean().backward()


def _peak_step_memory(preset, shape, name):
    """MB of resident memory one forward+backward adds at its peak, in this (fresh) process: Linux's peak-RSS
    counter is reset after a warm-up step (/proc/self/clear_refs), then read (VmHWM) after a measured step."""
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    with tempfile.TemporaryDirectory() as d:
        run = _bench_pair(preset, shape, d)[name]
    _step(run)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    _step(run)
    return status("VmHWM") - base


def _bench(steps=5):
    """Forward+backward time and peak memory of our BERT-base (8 x 128) and CLIP-T (72 x 77) against transformers'
    sdpa implementations on identical weights and inputs. Times alternate step by step in one process (the median
    is printed); each memory figure comes from a fresh process with glibc's malloc returning freed memory at once."""
    import subprocess
    import time
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("the benchmark compares against transformers: `pip install -r requirements-test.txt` first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {steps} steps")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for preset, shape in (("bert-base", (8, 128)), ("clip", (72, 77))):
        with tempfile.TemporaryDirectory() as d:
            runs = _bench_pair(preset, shape, d)
        times = {name: [] for name in runs}
        for i in range(steps + 1):
            for name, run in runs.items():
                t = time.perf_counter()
                _step(run)
                times[name].append(time.perf_counter() - t)
        t = {name: sorted(v[1:])[steps // 2] for name, v in times.items()}
        mem = {name: float(subprocess.check_output(
            [sys.executable, __file__, "bench-memory", preset, str(shape[0]), str(shape[1]), name], env=env))
            for name in runs}
        print(f"{preset:9s} {shape[0]:2d} x {shape[1]:3d}: fwd+bwd ours {t['ours'] * 1e3:6.0f} ms, transformers "
              f"{t['transformers'] * 1e3:6.0f} ms, ratio {t['ours'] / t['transformers']:.2f} | peak step memory "
              f"ours {mem['ours']:5.0f} MB, transformers {mem['transformers']:5.0f} MB, "
              f"ratio {mem['ours'] / mem['transformers']:.2f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["bench"]:
        _bench()
    elif sys.argv[1:2] == ["bench-memory"]:
        preset, B, T, name = sys.argv[2:]
        print(_peak_step_memory(preset, (int(B), int(T)), name))
    else:
        print("Table 6 parameter counts, computed from the presets on the meta device (task heads not counted)")
        for name, ours in table6():
            paper = PAPER_TABLE6[name]
            note = "  (+1: CLIP's logit scale, counted but not kept)" if name.startswith("X") else ""
            print(f"  {name:11s} ours {ours:>12,}  paper {paper:>12,}  {'match' if ours == paper else 'DIFFER'}{note}")


def linear_warmup_decay(step, total, warmup_fraction):
    """Learning-rate factor of App. C.1 and C.2's schedule: linear warm-up over the first ceil(fraction x total)
    steps, then linear decay to 0 at `total` (transformers' get_linear_schedule_with_warmup with the warm-up steps
    of its Trainer, math.ceil(total * warmup_ratio))."""
    warmup = math.ceil(total * warmup_fraction)
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
