"""XDBERT's models in plain PyTorch (Hsu, Lee and Tsao, ACL 2022): BERT / ELECTRA, CLIP-T and the cross-modal layers
of Sec. 2.1 (Fig. 3) with the adaptation losses of Sec. 2.3; safetensors, atomic writes, and the public Hugging Face
checkpoints through explicit name tables. `python model.py` prints Table 6."""
import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- configs (Table 4, App. B)

@dataclass
class EncoderConfig:
    """A BERT-family language encoder (Table 4); embedding_size != hidden_size adds ELECTRA-small's projection."""
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
    initializer_range: float = 0.02  # std of new weights, the encoder's and the cross-modal layers' (LXMERT's rule)


@dataclass
class CLIPTextConfig:
    """CLIP-T, the text tower of CLIP ViT-B/32 (App. B): 77 positions, causal self-attention, 512-wide projection."""
    vocab_size: int = 49408
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    ffn_size: int = 2048
    context_length: int = 77
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5


_LARGE = dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096)
_TOY = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128, max_positions=128)
PRESETS = {
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(**_LARGE),
    "electra-base": EncoderConfig(model_type="electra", pooler=False),
    "electra-large": EncoderConfig(model_type="electra", pooler=False, **_LARGE),
    "clip": CLIPTextConfig(),
    # tiny models for the tests and the offline toy kit (which sets vocab_size to its trained tokenizers)
    "bert-toy": EncoderConfig(**_TOY),
    "electra-toy": EncoderConfig(model_type="electra", embedding_size=32, pooler=False, **_TOY),
    "clip-toy": CLIPTextConfig(vocab_size=1024, width=48, num_layers=2, num_heads=4, ffn_size=96, projection_dim=32),
}


# ----------------------------------------------------------------------------- the encoders

class Attention(nn.Module):
    """Eq. 1, softmax(Q K^T / sqrt(D)) V; with kv_dim, cross-attention: K and V from the other stream (App. B)."""

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
        # x (B, T, D), context (B, S, D_kv) or None, mask (B, S) 1 = a real key or None: no padding (SDPA's fastest)
        B, T, D = x.shape
        if context is None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(context).split(D, dim=-1)
        q, k, v = (t.view(B, -1, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        mask = None if mask is None else mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, heads, T, D/heads) -> (B, T, D)


class Sublayer(nn.Module):
    """Attention (kv_dim: cross-attention) or, given ffn_size, the FFN (dense, GELU, dense) with its residual: BERT's
    and LXMERT's post-LN LayerNorm(x + dropout(f(x))), or with clip CLIP-T's pre-LN x + f(LayerNorm(x)), causal."""

    def __init__(self, dim, eps, dropout=0.0, num_heads=None, kv_dim=None, ffn_size=None, clip=False):
        super().__init__()
        if ffn_size is None:
            self.attn = Attention(dim, num_heads, kv_dim, dropout)
        else:
            self.fc = nn.Linear(dim, ffn_size)
            self.proj = nn.Linear(ffn_size, dim)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.clip = clip

    def forward(self, x, context=None, mask=None):
        h = self.ln(x) if self.clip else x
        if hasattr(self, "attn"):
            y = self.attn(h, context, mask, causal=self.clip)
        else:
            h = self.fc(h)
            y = self.proj(h * torch.sigmoid(1.702 * h) if self.clip else F.gelu(h))  # quick-GELU, CLIP's GELU
        return x + y if self.clip else self.ln(x + self.drop(y))


class Block(nn.Module):
    """One encoder layer, attention then FFN: BERT / ELECTRA's post-LN one, or with clip CLIP-T's pre-LN causal one."""

    def __init__(self, dim, num_heads, ffn_size, eps, dropout=0.0, clip=False):
        super().__init__()
        self.attention = Sublayer(dim, eps, dropout, num_heads=num_heads, clip=clip)
        self.ffn = Sublayer(dim, eps, dropout, ffn_size=ffn_size, clip=clip)

    def forward(self, x, mask=None):
        return self.ffn(self.attention(x, mask=mask))


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
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:input_ids.shape[1]]
        x = self.drop(self.ln(x + self.token_type_embeddings(token_type_ids)))
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
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, cfg.num_heads, cfg.ffn_size, cfg.layer_norm_eps, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.pooler = Pooler(cfg.hidden_size) if cfg.pooler else None
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        # input_ids (B, T), attention_mask (B, T) or None (no padding) -> hidden (B, T, H), pooled (B, H) or None
        x = self.embeddings(input_ids, torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return x, (self.pooler(x) if self.pooler is not None else None)


class CLIPTextTransformer(nn.Module):
    """CLIP-T (Sec. 2.2, App. B): token + position embeddings, causal pre-LN layers, final LN, text projection."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, cfg.ffn_size, cfg.layer_norm_eps, clip=True)
                                    for _ in range(cfg.num_layers))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.positional_embedding, std=0.01)  # CLIP's own initialisation of these two
        nn.init.normal_(self.text_projection.weight, std=cfg.width ** -0.5)

    def forward(self, input_ids):
        # input_ids (N, 77) -> tokens (N, 77, P), pooled (N, P) at the end-of-text token (the largest id)
        x = self.token_embedding(input_ids) + self.positional_embedding[:input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        tokens = self.text_projection(self.ln_final(x))
        pooled = tokens[torch.arange(len(tokens), device=tokens.device), input_ids.argmax(dim=-1)]
        return tokens, pooled


def init_weights(module, std=0.02):
    """BERT's initialisation of new Linear / Embedding weights: normal(0, std), zero biases (LNs start at 1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def count_parameters(module):
    """Number of scalars in a module's parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the cross-modal encoder (Fig. 3)

class CrossModalLayer(nn.Module):
    """LXMERT's cross-modal layer (Sec. 2.1, Fig. 3) on lang (B, T, H) and vis (B, n*77, P): cross-attention both ways
    (Eq. 1), then self-attention and FFN per stream; the CLIP stream takes the encoder's FFN size (Table 6)."""

    def __init__(self, lang: EncoderConfig, clip: CLIPTextConfig):
        super().__init__()
        H, P, eps, p = lang.hidden_size, clip.projection_dim, lang.layer_norm_eps, lang.dropout
        self.lang_cross = Sublayer(H, eps, p, lang.num_heads, kv_dim=P)
        self.vis_cross = Sublayer(P, eps, p, clip.num_heads, kv_dim=H)
        self.lang_self = Sublayer(H, eps, p, lang.num_heads)
        self.vis_self = Sublayer(P, eps, p, clip.num_heads)
        self.lang_ffn = Sublayer(H, eps, p, ffn_size=lang.ffn_size)
        self.vis_ffn = Sublayer(P, eps, p, ffn_size=lang.ffn_size)

    def forward(self, lang, vis, lang_mask, vis_mask):
        lang, vis = self.lang_cross(lang, vis, vis_mask), self.vis_cross(vis, lang, lang_mask)
        lang, vis = self.lang_self(lang, mask=lang_mask), self.vis_self(vis, mask=vis_mask)
        return self.lang_ffn(lang), self.vis_ffn(vis)


class TokenPredictionHead(nn.Module):
    """BERT's MLM head, dense, GELU, LayerNorm, tied decoder, own bias: for MLM (Sec. 2.3.1) and CLIPTC (Sec. 2.3.3)."""

    def __init__(self, dim, embedding_dim, vocab_size, eps):
        super().__init__()
        self.dense = nn.Linear(dim, embedding_dim)
        self.ln = nn.LayerNorm(embedding_dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x, embedding_weight):
        # x (N, D) -> logits (N, vocabulary); embedding_weight (vocabulary, E) is the tied decoder
        return F.linear(self.ln(F.gelu(self.dense(x))), embedding_weight, self.bias)


def token_loss(head, hidden, positions, targets, embedding_weight):
    """Cross-entropy at K chosen positions per sequence, averaged over the real targets (an unused slot's is -100)."""
    chosen = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, L, D) -> (B, K, D)
    logits = head(chosen, embedding_weight).float().flatten(0, 1)  # (B*K, vocabulary)
    return F.cross_entropy(logits, targets.flatten(), reduction="sum") / (targets >= 0).sum().clamp(min=1)


ADAPT_TASKS = ("mlm", "match", "cliptc")  # the adaptation tasks of Sec. 2.3


class CrossModalTransformer(nn.Module):
    """The adaptation model (Sec. 2.1, 2.3): both encoders, the cross-modal layers and the chosen tasks' heads (Table 3
    ablates them), the loss their sum. clip_cfg=None with xlayers=0 is Sec. 3's baseline, plain MLM."""

    def __init__(self, lang_cfg: EncoderConfig, clip_cfg: CLIPTextConfig | None, xlayers=2, tasks=ADAPT_TASKS):
        super().__init__()
        if unknown := set(tasks) - set(ADAPT_TASKS):
            raise ValueError(f"unknown adaptation task(s) {sorted(unknown)}: choose from {', '.join(ADAPT_TASKS)}")
        if clip_cfg is None and (xlayers or set(tasks) - {"mlm"}):
            raise ValueError("without CLIP-T only the plain MLM baseline exists: use xlayers=0 and tasks=('mlm',)")
        self.tasks = tuple(t for t in ADAPT_TASKS if t in tasks)
        self.language = LanguageEncoder(lang_cfg)
        if self.language.pooler is not None:
            self.language.pooler.requires_grad_(False)  # adaptation never uses it; XDBERT keeps BERT's pooler
        self.clip = CLIPTextTransformer(clip_cfg) if clip_cfg is not None else None
        self.xlayers = nn.ModuleList(CrossModalLayer(lang_cfg, clip_cfg) for _ in range(xlayers))
        H, eps = lang_cfg.hidden_size, lang_cfg.layer_norm_eps
        if "mlm" in self.tasks:
            self.mlm_head = TokenPredictionHead(H, lang_cfg.embedding_size or H, lang_cfg.vocab_size, eps)
        if "match" in self.tasks:
            self.match_pooler = Pooler(H)  # the cross-modal [CLS] pooler (also full-model finetuning's, App. C.3)
            self.match_classifier = nn.Linear(H, 2)  # class 1: both streams hold the same text
        if "cliptc" in self.tasks:
            self.cliptc_head = TokenPredictionHead(clip_cfg.projection_dim, clip_cfg.width, clip_cfg.vocab_size, eps)
        for name, module in self.named_children():
            if name not in ("language", "clip"):  # new layers: the language config's std, as LXMERT
                module.apply(lambda m: init_weights(m, lang_cfg.initializer_range))

    def encode(self, input_ids, attention_mask, token_type_ids, clip_ids, clip_mask, clip_blocks=None):
        """Both encoders, then the cross-modal layers -> lang (B, T, H), vis (B, n*77, P) or None. CLIP-T runs on the
        clip_blocks (N,) of the B*n blocks (None: all); the others, all padding, enter the layers as masked zeros."""
        lang, _ = self.language(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        if self.clip is None:
            return lang, None
        B, n, C = clip_ids.shape
        blocks = clip_ids.reshape(B * n, C)  # (B, n, 77) -> (B*n, 77)
        vis, _ = self.clip(blocks if clip_blocks is None else blocks[clip_blocks])  # (B*n or N, 77, P)
        if clip_blocks is not None:  # (N, 77, P) -> (B*n, 77, P)
            vis = vis.new_zeros(B * n, C, vis.shape[-1]).index_copy(0, clip_blocks, vis)
        vis = vis.reshape(B, n * C, -1)  # -> (B, n*77, P), e.g. (B, 693, 512)
        for layer in self.xlayers:
            lang, vis = layer(lang, vis, attention_mask, clip_mask.reshape(B, n * C))
        return lang, vis

    def forward(self, input_ids, attention_mask=None, clip_ids=None, clip_mask=None, token_type_ids=None,
                clip_blocks=None, mlm_positions=None, mlm_targets=None, match_labels=None, cliptc_positions=None,
                cliptc_targets=None):
        """A batch of data.AdaptationData -> {task: loss, "match_acc", "loss"}, the losses of Sec. 2.3 and their sum."""
        lang, vis = self.encode(input_ids, attention_mask, token_type_ids, clip_ids, clip_mask, clip_blocks)
        out = {}
        if "mlm" in self.tasks:  # Sec. 2.3.1: masked tokens from the language stream
            out["mlm"] = token_loss(self.mlm_head, lang, mlm_positions, mlm_targets,
                                    self.language.embeddings.word_embeddings.weight)
        if "match" in self.tasks:  # Sec. 2.3.2: do both streams hold the same sentence? from the cross-modal [CLS]
            logits = self.match_classifier(self.match_pooler(lang))  # (B, 2)
            out["match"] = F.cross_entropy(logits.float(), match_labels)
            out["match_acc"] = (logits.argmax(-1) == match_labels).float().mean().detach()
        if "cliptc" in self.tasks:  # Sec. 2.3.3: 15% of the CLIP tokens from the CLIP stream, input unmasked
            out["cliptc"] = token_loss(self.cliptc_head, vis, cliptc_positions, cliptc_targets,
                                       self.clip.token_embedding.weight)
        out["loss"] = sum(out[t] for t in self.tasks)
        return out


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
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{bad} (its header is unreadable): {redo}") from None
    header.pop("__metadata__", None)
    body, tensors = memoryview(data)[8 + n:], {}
    for name, info in header.items():
        (begin, end), dtype = info["data_offsets"], _DTYPES[info["dtype"]]
        if end > len(body) or end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"{bad}: tensor {name} lies past its end ({end} > {len(body)} bytes of data); {redo}")
        flat = torch.frombuffer(body[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def write_safetensors(tensors, path, metadata=None):
    """Write tensors as .safetensors (header padded to 8 bytes), atomically."""
    codes = {v: k for k, v in _DTYPES.items()}
    header, offset, blobs = ({"__metadata__": metadata} if metadata else {}), 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_file(path) as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.writelines(blobs)


# ----------------------------------------------------------------------------- atomic writes

def _temp_sibling(path):
    """A fresh name beside `path`, `<name>.<pid>.<random>.tmp`, which sweep_stale removes once <pid> has died."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _replace(tmp, path):
    """os.replace, then an fsync of the folder that makes the rename durable."""
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """open(path, mode) whose file appears under its name only once written and fsynced; text modes write UTF-8."""
    tmp = _temp_sibling(path)
    f = open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""}))
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    _replace(tmp, path)


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file under `path`."""
    with atomic_file(path) as f:
        torch.save(obj, f)


@contextlib.contextmanager
def atomic_dir(path):
    """A temporary folder that replaces `path` on success, the old one moved aside (`<path>.<pid>.old`) and removed
    last: a complete copy exists at every moment."""
    tmp, aside = _temp_sibling(path), f"{os.path.abspath(path)}.{os.getpid()}.old"
    os.mkdir(tmp)
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, aside)
        _replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_stale(folder):
    """Remove the temporary files and folders of dead processes in `folder`, put back an aside folder that nothing
    replaced; returns the entries handled."""
    handled = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        match = re.fullmatch(r"(.+)\.(\d+)\.(\w+\.tmp|old)", entry)
        if not match or _alive(int(match[2])):  # this process's own too
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
    except OSError as e:  # ProcessLookupError: dead; PermissionError: another user's process
        return isinstance(e, PermissionError)
    return True


# ----------------------------------------------------------------------------- Hugging Face checkpoints

# our config field -> the config.json key of BertConfig / ElectraConfig (old files may lack the optional ones), CLIP's
_SHARED_KEYS = {"vocab_size": "vocab_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "ffn_size": "intermediate_size", "layer_norm_eps": "layer_norm_eps"}
ENCODER_KEYS = _SHARED_KEYS | {"hidden_size": "hidden_size", "max_positions": "max_position_embeddings",
                               "type_vocab_size": "type_vocab_size", "dropout": "hidden_dropout_prob",
                               "initializer_range": "initializer_range"}
ENCODER_OPTIONAL = ("type_vocab_size", "layer_norm_eps", "dropout", "initializer_range")
CLIP_KEYS = _SHARED_KEYS | {"width": "hidden_size", "context_length": "max_position_embeddings",
                            "projection_dim": "projection_dim"}

# Our tensor names -> the Hugging Face names, as renamed leading modules (in a layer: after blocks.<i>.); several
# names are concatenated on dim 0, and a name that no entry renames is the same in both.
BERT_NAMES = {"embeddings.ln": ["embeddings.LayerNorm"], "embeddings.project": ["embeddings_project"]}
BERT_LAYER_NAMES = {"attention.attn.qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
                    "attention.attn.proj": ["attention.output.dense"], "attention.ln": ["attention.output.LayerNorm"],
                    "ffn.fc": ["intermediate.dense"], "ffn.proj": ["output.dense"], "ffn.ln": ["output.LayerNorm"]}
CLIP_NAMES = {"token_embedding": ["text_model.embeddings.token_embedding"], "ln_final": ["text_model.final_layer_norm"],
              "positional_embedding": ["text_model.embeddings.position_embedding.weight"]}
CLIP_LAYER_NAMES = {"attention.attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    "attention.attn.proj": ["self_attn.out_proj"], "attention.ln": ["layer_norm1"],
                    "ffn.fc": ["mlp.fc1"], "ffn.proj": ["mlp.fc2"], "ffn.ln": ["layer_norm2"]}

# BERT's pretraining heads and pooler, which the MLM head and MATCH start from where a checkpoint has them (Sec. 2.3)
PRETRAINING_HEAD_NAMES = {"mlm_head.bias": "cls.predictions.bias"} | {
    f"{ours}.{p}": f"{hf}.{p}" for p in ("weight", "bias") for ours, hf in (
        ("mlm_head.dense", "cls.predictions.transform.dense"), ("mlm_head.ln", "cls.predictions.transform.LayerNorm"),
        ("match_classifier", "cls.seq_relationship"), ("match_pooler.dense", "pooler.dense"))}

# checkpoint tensors known and left out: old buffers, CLIP's image tower and logit scale, ELECTRA's unused projection
# (HF#7530) and RTD head, BERT's pretraining heads (the MLM decoder is tied, the others are read apart)
UNUSED = re.compile(r"logit_scale|.*position_ids|(cls|vision_model|visual_projection|embeddings_project|"
                    r"discriminator_predictions)\..*")


def hf_names(module):
    """Our tensor -> the BertModel / ElectraModel / CLIPTextModelWithProjection tensors it is made of."""
    clip, names = isinstance(module, CLIPTextTransformer), {}
    for name in module.state_dict():
        layer, inner = re.fullmatch(r"(?:blocks\.(\d+)\.)?(.*)", name).groups()
        table = (CLIP_LAYER_NAMES if clip else BERT_LAYER_NAMES) if layer else (CLIP_NAMES if clip else BERT_NAMES)
        ours = next((m for m in table if inner == m or inner.startswith(m + ".")), "")
        start = "" if layer is None else f"{'text_model.encoder.layers' if clip else 'encoder.layer'}.{layer}."
        names[name] = [start + hf + inner[len(ours):] for hf in table.get(ours, [""])]
    return names


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
    kind = c.get("model_type")
    if kind in ("clip", "clip_text_model"):
        t = (c.get("text_config") or {}) if kind == "clip" else c  # CLIPModel nests the text tower's config
        fields = {ours: t.get(hf, getattr(CLIPTextConfig, ours)) for ours, hf in CLIP_KEYS.items()}
        fields["projection_dim"] = c.get("projection_dim", fields["projection_dim"])
        return CLIPTextConfig(**fields), "clip"
    if kind not in ("bert", "electra"):
        raise ValueError(f"{file}: model_type {kind!r} is not one of bert, electra, clip")
    if c.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: hidden_act {c['hidden_act']!r} is not supported (BERT and ELECTRA use 'gelu')")
    if missing := [hf for ours, hf in ENCODER_KEYS.items() if hf not in c and ours not in ENCODER_OPTIONAL]:
        raise ValueError(f"{file} lacks the key {missing[0]!r} of a {kind} config: {_redownload(path)}")
    fields = {ours: c.get(hf, getattr(EncoderConfig, ours)) for ours, hf in ENCODER_KEYS.items()}
    emb = c.get("embedding_size", c["hidden_size"])
    return EncoderConfig(model_type=kind, embedding_size=None if emb == c["hidden_size"] else emb,
                         pooler=kind == "bert", **fields), kind


def read_checkpoint(path):
    """All tensors of a hub-layout directory (model.safetensors, else pytorch_model.bin), with the "bert." /
    "electra." prefix of old files dropped and LayerNorm gamma/beta renamed weight/bias."""
    files = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")]
    file = next((f for f in files if os.path.isfile(f)), None)
    if file is None:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}: the download is incomplete, "
                                f"{_redownload(path)}")
    if file == files[0]:
        state = read_safetensors(file)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many kinds on a damaged file; its message says which
            raise ValueError(f"{file} cannot be read ({type(e).__name__}: {e}): {_redownload(path)}") from None
    state = {re.sub(r"^(bert|electra)\.", "", k): v for k, v in state.items()}
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in state.items()}


def from_hf(path):
    """A LanguageEncoder (bert, electra) or CLIPTextTransformer (clip) from a hub-layout directory, read strictly."""
    cfg, kind = config_from_hf(path)
    state = read_checkpoint(path)
    module = CLIPTextTransformer(cfg) if kind == "clip" else LanguageEncoder(cfg)
    table, ours = hf_names(module), {}
    for name, expected in module.state_dict().items():
        if missing := [p for p in table[name] if p not in state]:
            raise ValueError(f"{path} has no tensor {missing[0]} (needed for {name}): is it a {kind} checkpoint of "
                             f"the layout config.json describes?")
        ours[name] = torch.cat([state.pop(p) for p in table[name]]).float()
        if ours[name].shape != expected.shape:
            raise ValueError(f"{path}: tensor for {name} has shape {tuple(ours[name].shape)}, config.json implies "
                             f"{tuple(expected.shape)}")
    if extra := [k for k in state if not UNUSED.fullmatch(k)]:  # what no tensor of ours took
        raise ValueError(f"{path} holds tensors this architecture does not have, e.g. {extra[0]}: it is not a plain "
                         f"{kind} checkpoint")
    module.load_state_dict(ours)
    return module


def load_crossmodal_from_hf(lang_dir, clip_dir, xlayers=2, tasks=ADAPT_TASKS):
    """The adaptation model from a BERT / ELECTRA and a CLIP checkpoint (clip_dir None: the MLM baseline), with the
    heads that BERT's checkpoint has (PRETRAINING_HEAD_NAMES)."""
    language = from_hf(lang_dir)
    if not isinstance(language, LanguageEncoder):
        raise ValueError(f"{lang_dir} holds a CLIP checkpoint; the language encoder must be BERT or ELECTRA")
    clip = from_hf(clip_dir) if clip_dir is not None else None
    if clip is not None and not isinstance(clip, CLIPTextTransformer):
        raise ValueError(f"{clip_dir} is not a CLIP checkpoint (its config.json model_type must be clip)")
    model = CrossModalTransformer(language.config, clip.config if clip else None, xlayers, tasks)
    model.language.load_state_dict(language.state_dict())
    if clip is not None:
        model.clip.load_state_dict(clip.state_dict())
    params, state = dict(model.named_parameters()), read_checkpoint(lang_dir)
    with torch.no_grad():
        for ours, hf in PRETRAINING_HEAD_NAMES.items():
            if ours in params and hf in state:  # the head of a chosen task, in a checkpoint that has it
                # NSP's class 0 is IsNext, MATCH's class 1 is "same text": the two rows swap
                params[ours].copy_(state[hf].flip(0) if ours.startswith("match_classifier.") else state[hf])
    return model


def save_hf(encoder, path):
    """A LanguageEncoder (e.g. XDBERT) or CLIPTextTransformer in the hub layout that transformers can read."""
    cfg, state = encoder.config, encoder.state_dict()
    if isinstance(cfg, CLIPTextConfig):
        config = {hf: getattr(cfg, ours) for ours, hf in CLIP_KEYS.items()} | {
            "model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"],
            "hidden_act": "quick_gelu", "bos_token_id": cfg.vocab_size - 2, "eos_token_id": cfg.vocab_size - 1}
    else:
        config = {hf: getattr(cfg, ours) for ours, hf in ENCODER_KEYS.items()} | {
            "model_type": cfg.model_type, "hidden_act": "gelu", "attention_probs_dropout_prob": cfg.dropout,
            "architectures": ["BertModel" if cfg.model_type == "bert" else "ElectraModel"]}
        if cfg.model_type == "electra":
            config["embedding_size"] = cfg.embedding_size or cfg.hidden_size
    tensors = {hf: chunk for ours, parts in hf_names(encoder).items()
               for hf, chunk in zip(parts, state[ours].chunk(len(parts)))}
    write_safetensors(tensors, os.path.join(path, "model.safetensors"), {"format": "pt"})
    with atomic_file(os.path.join(path, "config.json"), "w") as f:
        f.write(json.dumps(config | {"pad_token_id": 0}, indent=2))


def save_crossmodal(model, path):
    """The whole adapted cross-modal transformer in one file (for full-model finetuning, App. C.3)."""
    atomic_save({"lang_cfg": asdict(model.language.config),
                 "clip_cfg": asdict(model.clip.config) if model.clip is not None else None,
                 "xlayers": len(model.xlayers), "tasks": list(model.tasks), "model": model.state_dict()}, path)


def load_crossmodal(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    clip_cfg = CLIPTextConfig(**blob["clip_cfg"]) if blob["clip_cfg"] else None
    model = CrossModalTransformer(EncoderConfig(**blob["lang_cfg"]), clip_cfg, blob["xlayers"], blob["tasks"])
    model.load_state_dict(blob["model"])
    return model


# ----------------------------------------------------------------------------- Table 6 and the schedule

PAPER_TABLE6 = {"BERT-b": 109_482_240, "XBERT-b": 202_059_009, "ELECTRA-l": 334_092_288, "XELECTRA-l": 442_671_617}


def table6():
    """Table 6 from the presets, without task heads; the cross-modal rows add CLIP's logit scale (+1, not kept)."""
    rows = {}
    with torch.device("meta"):
        for name, preset in (("BERT-b", "bert-base"), ("ELECTRA-l", "electra-large")):
            x = CrossModalTransformer(PRESETS[preset], PRESETS["clip"], xlayers=2, tasks=())
            rows |= {name: count_parameters(x.language), "X" + name: count_parameters(x) + 1}
    return rows


def linear_warmup_decay(step, total, warmup_fraction):
    """App. C.1 / C.2's learning-rate factor: linear warm-up over ceil(fraction x total) steps, then decay to 0."""
    warmup = math.ceil(total * warmup_fraction)
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


if __name__ == "__main__":
    print("Table 6 parameter counts, computed from the presets on the meta device (task heads not counted)")
    for name, ours in table6().items():
        paper = PAPER_TABLE6[name]
        note = "  (+1: CLIP's logit scale, counted but not kept)" if name.startswith("X") else ""
        print(f"  {name:11s} ours {ours:>12,}  paper {paper:>12,}  {'match' if ours == paper else 'DIFFER'}{note}")
