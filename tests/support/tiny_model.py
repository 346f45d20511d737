"""Build a tiny random Llama causal LM plus a ChatML tokenizer, fully offline.

    path = build_tiny_model(tmp_path / "tiny", texts=["my card was charged twice", ...])
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The tokenizer is a byte-level BPE trained on ``texts`` (plus a small built-in
corpus), so every input string tokenizes without an unknown token and decodes
back to itself.  Its chat template renders ChatML exactly like
SmolLM2-Instruct (minus SmolLM2's injected default system prompt):

    <|im_start|>{role}\n{content}<|im_end|>\n   per message
    <|im_start|>assistant\n                     when add_generation_prompt

Special tokens: ``<|endoftext|>`` (unused filler id 0), ``<|im_start|>`` (bos,
never added automatically), ``<|im_end|>`` (eos) and ``<|pad|>`` (pad).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

__all__ = [
    "build_tiny_model",
    "build_tiny_llama3_model",
    "LLAMA3_TEMPLATE",
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
]

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = ["<|endoftext|>", BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3.1-Instruct's shape: bos added by the template, the turn ends with <|eot_id|> (the tokenizer's eos),
# <|end_of_text|> also ends generation (both in generation_config.eos_token_id), a pad token of its own.
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOT = "<|eot_id|>"
LLAMA3_END_OF_TEXT = "<|end_of_text|>"
LLAMA3_PAD = "<|finetune_right_pad_id|>"
LLAMA3_SPECIAL_TOKENS = [LLAMA3_BOS, LLAMA3_END_OF_TEXT, "<|start_header_id|>", "<|end_header_id|>", LLAMA3_EOT, LLAMA3_PAD]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

VOCAB_SIZE = 1536

# Always part of the BPE training data so the vocabulary has a sensible size
# and covers the chat-role words, whatever ``texts`` holds.
_BASE_CORPUS = [
    "system", "user", "assistant", "tool",
    "You are a helpful assistant. Answer with a single word.",
    "Classify the support ticket into one of the categories.",
    "The quick brown fox jumps over the lazy dog.",
    "Please reply in JSON with the fields label and confidence.",
    "billing, shipping, technical, account, refund, other",
    "Hello! How can I help you today? Thanks, bye.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 {\"a\": [1, 2]}",
    "My order has not arrived yet and the tracking number does not work.",
    "I cannot log in to my account after resetting the password.",
    "The app crashes when I open the settings page on my phone.",
    "I was charged twice for the same subscription this month.",
    "Can you send me an invoice for my last payment, please?",
    "The package was delivered to the wrong address yesterday.",
    "How do I change the email address on my profile?",
    "Your service is great, but the website is very slow in the evening.",
    "Summarize the following document in three short sentences.",
    "Extract the name, date and amount from the receipt below.",
    "Translate the sentence into French and then into German.",
    "Write a polite answer to the customer who wants a refund.",
    "The model should output only the category name, nothing else.",
    "Weather report: sunny in the morning, rain in the afternoon, cold at night.",
    "Error: connection timed out after 30 seconds while uploading the file.",
    "Meeting notes: we agreed to release the new version on Friday.",
    "Question: what is the capital of France? Answer: Paris.",
    "Revenue grew by twelve percent compared with the previous quarter.",
    "Install the package, restart the computer and try again.",
    "The battery drains quickly since the latest software update.",
    "Cancel my membership and delete all my personal data.",
    "Product review: excellent quality, fast delivery, would buy again.",
    "Product review: terrible experience, the item broke after two days.",
    "def add(a, b):\n    return a + b\n",
    "SELECT name, total FROM orders WHERE status = 'open' ORDER BY total DESC;",
    "https://example.com/help/articles?id=42&lang=en",
    "Dear team, thank you for your quick response and kind support.",
    "positive negative neutral urgent normal low high medium critical",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January February March April May June July August September October November December",
    "one two three four five six seven eight nine ten eleven twelve twenty hundred thousand",
    "red green blue yellow black white orange purple brown grey",
    "apple banana cherry grape lemon mango orange peach pear strawberry",
]


def _train_tokenizer(texts: list[str], special_tokens: list[str] = SPECIAL_TOKENS):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (needed by
    # return_assistant_tokens_mask / char_to_token).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_model(out_dir: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` and its ChatML tokenizer to ``out_dir``.

    Deterministic for a given (texts, seed).  Returns ``out_dir``.
    """
    return _build(out_dir, texts, seed, SPECIAL_TOKENS, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, CHATML_TEMPLATE, [EOS_TOKEN])


def build_tiny_llama3_model(out_dir: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """The same tiny model with a Llama-3-Instruct-shaped tokenizer: ``<|eot_id|>`` ends a turn (the tokenizer's
    eos), ``<|end_of_text|>`` ends generation too (``generation_config.eos_token_id`` lists both), the pad token
    is ``<|finetune_right_pad_id|>``, and the chat template writes the bos and the header tokens."""
    return _build(out_dir, texts, seed, LLAMA3_SPECIAL_TOKENS, LLAMA3_BOS, LLAMA3_EOT, LLAMA3_PAD, LLAMA3_TEMPLATE,
                  [LLAMA3_EOT, LLAMA3_END_OF_TEXT])


def _build(out_dir: Path, texts: Iterable[str], seed: int, special_tokens: list[str], bos: str, eos: str, pad: str,
           template: str, stop_tokens: list[str]) -> Path:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = [t for t in texts if isinstance(t, str) and t] + _BASE_CORPUS

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(corpus, special_tokens),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    stop_ids = tokenizer.convert_tokens_to_ids(stop_tokens)
    eos_ids = stop_ids[0] if len(stop_ids) == 1 else stop_ids

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
