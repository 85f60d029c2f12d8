"""A conversation as token ids, appended turn by turn: token in, token out.

An episode's tokens are never re-rendered from text. The first messages are rendered once by the model's chat
template (with the generation prompt); after that each assistant turn is the sampled tokens themselves, and what the
environment says back (tool results, observations) is appended as the token ids of the template's own rendering of
those messages, taken as the difference between two renderings of a fixed probe conversation. So the context the
generator saw for every sampled token is exactly what the trainer feeds the policy, however the template would render
the whole transcript (some templates rewrite earlier turns, e.g. dropping old reasoning).
"""

from __future__ import annotations

from rltrain.errors import ConfigError

PROBE_USER = "Hello"
PROBE_REPLY = "rltrainprobereply"  # letters only: a template that strips or escapes content leaves it as it is


class ChatTokens:
    """Renders a conversation's first messages and the messages appended after each assistant turn."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("agent episodes need a model with a chat template (tokenizer.chat_template is empty)")
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(tokenizer)
        self._probe_cache: dict[str, str] = {}

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The first messages with the generation prompt: the context of the first assistant turn."""
        return self.encode(self.render(messages, tools=tools))

    def append(self, messages: list[dict], *, after_eos: bool) -> list[int]:
        """Token ids that follow an assistant turn to add ``messages`` and open the next assistant turn.

        ``after_eos``: the turn's sampled tokens end with the end-of-turn token, which is then not repeated; a turn
        that ended otherwise (a stop string, the token limit) is closed here as the template closes one.
        """
        suffix = self._suffix(messages)
        if after_eos:
            for eos in self.eos_ids:
                text = self.tokenizer.decode([eos])
                if suffix.startswith(text):
                    suffix = suffix[len(text):]
                    break
        return self.encode(suffix)

    def _suffix(self, messages: list[dict]) -> str:
        """The template's text after an assistant turn's content, through the added messages and the next
        generation prompt (from a probe conversation: user, assistant, then ``messages``)."""
        probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]
        before = self.render(probe, generation_prompt=False)
        after = self.render(probe + list(messages))
        at = before.rfind(PROBE_REPLY)
        if at < 0 or not after.startswith(before[: at + len(PROBE_REPLY)]):
            raise ConfigError("this chat template renders an assistant turn differently once messages follow it, "
                              "so the messages after a turn cannot be appended as tokens")
        return after[at + len(PROBE_REPLY):]


def _eos_ids(tokenizer) -> list[int]:
    """The end-of-turn tokens: the tokenizer's EOS, and ChatML's <|im_end|> / <|eot_id|> where they exist."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids
