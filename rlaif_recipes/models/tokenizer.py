"""A torchtune ModelTokenizer that renders chats with an HF checkpoint's own chat template.

torchtune's recipes (e.g. `full_finetune_single_device`) tokenize with a ModelTokenizer; the
samplers render prompts with `AutoTokenizer.apply_chat_template`. Using the same template here
keeps the token ids a model is trained on identical to the ids it is later prompted with, for any
HF checkpoint that has a chat template (the tiny model included), with no template re-typed in Python.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message, truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from transformers import AutoTokenizer

from rlaif_recipes.errors import CheckpointError


class HFChatTokenizer(ModelTokenizer, Transform):
    """Tokenize chat messages with the chat template in `path` (an HF checkpoint directory).

    Each message's tokens are what rendering it adds to the conversation so far; a turn's header
    (e.g. `<|assistant|>`, added by the generation prompt) counts as prompt, so with masked user
    turns the loss covers exactly the assistant's text and its end-of-turn token.
    """

    def __init__(self, path: str, max_seq_len: Optional[int] = None) -> None:
        self.hf = AutoTokenizer.from_pretrained(path)
        if not self.hf.chat_template:
            raise CheckpointError(f"{path} has no chat_template in tokenizer_config.json; add one or use a torchtune tokenizer")
        self.max_seq_len = max_seq_len
        self.special_tokens: Dict[str, int] = {t: self.hf.convert_tokens_to_ids(t) for t in self.hf.all_special_tokens}
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> List[int]:
        """Token ids of the chat template applied to `messages` (as the samplers render them)."""
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def tokenize_messages(self, messages: List[Message], add_end_tokens: bool = True) -> Tuple[List[int], List[bool]]:
        """(tokens, mask) for a conversation; mask is True where the loss ignores a token.

        add_end_tokens=False renders a prompt to generate from: a trailing empty assistant
        message is dropped and the generation prompt is appended.
        """
        chat = [{"role": m.role, "content": m.text_content} for m in messages]
        if not add_end_tokens:
            if chat and chat[-1]["role"] == "assistant" and not chat[-1]["content"]:
                chat = chat[:-1]
            tokens = self.render(chat, add_generation_prompt=True)
            return self._truncate(tokens, [True] * len(tokens), eos_id=None)
        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            if message.role == "assistant":  # the turn header belongs to the prompt
                tokens, mask = self._extend(tokens, mask, self.render(chat[:i], add_generation_prompt=True), True)
            tokens, mask = self._extend(tokens, mask, self.render(chat[: i + 1], add_generation_prompt=False), message.masked)
        return self._truncate(tokens, mask, eos_id=self.eos_id)

    @staticmethod
    def _extend(tokens: List[int], mask: List[bool], rendered: List[int], masked: bool) -> Tuple[List[int], List[bool]]:
        """Take the tokens `rendered` adds after `tokens`, all with the same mask value."""
        if rendered[: len(tokens)] != tokens:
            raise CheckpointError(
                "the chat template does not render a conversation prefix by prefix (a later message "
                "changes earlier tokens), so HFChatTokenizer cannot mask it turn by turn"
            )
        new = rendered[len(tokens) :]
        return tokens + new, mask + [masked] * len(new)

    def _truncate(self, tokens: List[int], mask: List[bool], eos_id: Optional[int]) -> Tuple[List[int], List[bool]]:
        if self.max_seq_len is None or len(tokens) <= self.max_seq_len:
            return tokens, mask
        return truncate(tokens, self.max_seq_len, eos_id), truncate(mask, self.max_seq_len)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """The torchtune Transform: a sample's "messages" -> "tokens" and "mask"."""
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(messages, add_end_tokens=not inference)
        return sample
