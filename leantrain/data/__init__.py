"""Data: tokenizers, corpus loading, the train/eval split and packed pretraining batches.

What the other modules use from here:

* :func:`build_tokenizer` -- ``"byte"`` or a local Hugging Face ``tokenizer.json`` (the :class:`Tokenizer`
  protocol, :class:`ByteTokenizer`, :class:`HFTokenizer`).
* :func:`build_datasets` / :func:`build_eval_dataset` -- the train and eval datasets of any data.format, from raw
  files (:func:`load_documents`, :func:`split_documents`: the last 5% of documents are the held-out split) or a
  folder written by ``leantrain prepare``; text is packed into windows of ``seq_len + 1`` tokens
  (:class:`PackedDataset`), served in a seeded, resumable, infinite order.

Every bad input raises :class:`leantrain.errors.DataError` with a message that names the file
(or key), says what is wrong and what is allowed.

``data.format="sft"`` (prompt/response pairs) and ``"chat"`` (``messages`` rendered with the tokenizer's chat
template, :mod:`leantrain.data.chat`) make :class:`TokenizedSamples` (token ids and target masks) and serve them
packed (:class:`PackedSftDataset`, batches with positions) or one per padded row (:class:`SftDataset`), with the
same interface; :func:`build_datasets` gives the train and eval datasets of any format.
"""

from .corpus import load_documents, split_documents
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "load_documents",
    "split_documents",
    "PackedDataset",
    "SftDataset",
    "PackedSftDataset",
    "TokenizedSamples",
    "best_fit_pack",
    "load_sft_samples",
    "load_samples",
    "record_sample",
    "chat_template",
    "render",
    "build_datasets",
    "build_eval_dataset",
]

_DATASETS = (
    "PackedDataset",
    "SftDataset",
    "PackedSftDataset",
    "TokenizedSamples",
    "best_fit_pack",
    "build_datasets",
    "build_eval_dataset",
    "load_samples",
    "load_sft_samples",
)
_CHAT = ("chat_template", "record_sample", "render")


def __getattr__(name: str):
    # The datasets need torch; the readers and tokenizers do not, and leantrain prepare's workers load only those.
    if name in _DATASETS:
        from . import datasets

        return getattr(datasets, name)
    if name in _CHAT:
        from . import chat

        return getattr(chat, name)
    raise AttributeError(f"module 'leantrain.data' has no attribute {name!r}")
