"""Tokenization for the engine: the `tokenizers`-backed tokenizer (from a Hugging Face
directory or a GGUF file), chat templates, incremental detokenization and stop strings.

Nothing here imports torch: the engine's output processing uses the detokenizer and the
stop-string matcher.
"""
from taskloom.tokenizer.chat_template import ChatTemplate, TemplateError, normalize_messages
from taskloom.tokenizer.detokenizer import IncrementalDetokenizer
from taskloom.tokenizer.stop import StopStringMatcher
from taskloom.tokenizer.tokenizer import Tokenizer, TokenizerConfig, load_tokenizer

__all__ = [
    "ChatTemplate",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "TemplateError",
    "Tokenizer",
    "TokenizerConfig",
    "load_tokenizer",
    "normalize_messages",
]
