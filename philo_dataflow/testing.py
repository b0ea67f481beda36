"""Fixtures shared by the test suite and the benchmarks' ``--smoke`` runs: a tiny model built in seconds,
small data sets cut from the example data, and a listing of a directory tree. Not given to the driver."""

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .lib.inputs import EMBEDDED_MODEL_ID, EXAMPLE_DATA_PATH
from .lib.model_sources import resolve_model_path

#: The repository's example data (306 alpaca records, 34 per school), when run from a checkout.
EXAMPLE_DATA = Path(EXAMPLE_DATA_PATH)


def tiny_model_dir(directory: Path, tokenizer: Any = None) -> str:
    """A randomly initialised 2-layer Llama (hidden size 32, tied embeddings) with ``tokenizer`` (default:
    the embedded model's), saved to ``directory``: the model of ``--smoke`` runs and of the test suite's
    ``tiny_model_dir`` fixtures."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL_ID))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    directory.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_neox_model_dir(directory: Path, tokenizer: Any) -> str:
    """A randomly initialised 2-layer GPT-NeoX (pythia's architecture; hidden size 32) with ``tokenizer``,
    saved to ``directory``: the full fine-tuning tests' model."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=1024, rotary_pct=0.25,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_t5_model_dir(directory: Path, texts: list[str]) -> str:
    """A randomly initialised T5 (one encoder and one decoder block, d_model 32) with a FLAN-T5-style
    tokenizer, saved to ``directory``: a unigram tokenizer trained on ``texts`` with T5's special tokens
    (``<pad>`` 0 = decoder start, ``</s>`` 1 appended to every encoded text, ``<unk>`` 2), since the real
    T5 sentencepiece model cannot be downloaded here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def example_subset(path: Path, per_school: int, schools: Optional[tuple] = None) -> str:
    """The first ``per_school`` example-data records of each of ``schools`` (default: all nine, sorted),
    written as JSONL to ``path``.

    :return: ``str(path)``.
    """
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text(encoding="utf-8").splitlines()]
    picked = []
    for school in schools or sorted({row["school"] for row in rows}):
        picked += [row for row in rows if row["school"] == school][:per_school]
    path.write_text("".join(json.dumps(row) + "\n" for row in picked), encoding="utf-8")
    return str(path)


def tree(root: Path) -> dict:
    """Every path under ``root`` (hidden ones included), relative path -> ``(mode,)`` for a directory and
    ``(mode, size, mtime_ns, sha256)`` for a file: two listings are equal only when nothing was created,
    removed, written or renamed (a directory's own time stamp is left out: a temporary file made and
    removed again changes it)."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        stat = path.lstat()
        if path.is_dir() and not path.is_symlink():
            found[str(path.relative_to(root))] = (stat.st_mode,)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            found[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, digest)
    return found
