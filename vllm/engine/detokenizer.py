"""Output text, stop strings, and the part of the text that is safe to stream."""

from __future__ import annotations

from vllm.outputs import Logprob
from vllm.sequence import Sequence, TokenLogprobs

# Decoding a prefix of the output can end in an unfinished UTF-8 character, shown as
# U+FFFD until the next token completes it; such a tail is never streamed.
_REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (``Logprob.decoded_token``), special tokens
        kept; a model's id past the tokenizer's vocabulary reads as ""."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def logprobs(self, scored: TokenLogprobs, detokenize: bool) -> dict[int, Logprob]:
        """Worker scores as ``Logprob``s, with each token's text when ``detokenize``."""
        if not detokenize or self.tokenizer is None:
            return {t: Logprob(lp, rank) for t, (lp, rank) in scored.items()}
        return {t: Logprob(lp, rank, self.token_text(t)) for t, (lp, rank) in scored.items()}

    def _decode(self, seq: Sequence, token_ids: list[int]) -> str:
        params = seq.sampling_params
        if not params.detokenize or self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def decode(self, seq: Sequence) -> None:
        """Set ``seq.output_text`` to the text of every output token so far.

        The whole output is decoded, not just the new token, so the text streamed so far
        is always a prefix of the final text (see ``streamable_text``).
        """
        seq.output_text = self._decode(seq, seq.output_token_ids)

    def check_stop_strings(self, seq: Sequence, can_stop: bool = True) -> str | None:
        """Decode the output so far; on a stop string, truncate ``output_text`` and return it.

        With ``can_stop`` False (before ``min_tokens``) only the text advances, so a stop
        string generated then is never found later.
        """
        params = seq.sampling_params
        # Text searched last step holds no stop string; only one ending in the new tail can.
        searched = len(seq.output_text.rstrip(_REPLACEMENT_CHAR))
        self.decode(seq)
        if not can_stop:
            return None
        text = seq.output_text
        hits = [(text.find(s, max(0, searched - len(s) + 1)), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        seq.output_text = (
            text[: index + len(stop)] if params.include_stop_str_in_output else (text[:index])
        )
        return stop

    def finalize(self, seq: Sequence) -> None:
        """Set the final text: a stop string or stop token is left out unless asked for."""
        params = seq.sampling_params
        if isinstance(seq.stop_reason, str):
            return  # check_stop_strings already cut the text at the stop string
        tokens = seq.output_token_ids
        if (
            seq.status.finish_reason == "stop"
            and tokens
            and tokens[-1] in params.all_stop_token_ids
            and not params.include_stop_str_in_output
        ):
            tokens = tokens[:-1]
        seq.output_text = self._decode(seq, tokens)

    @staticmethod
    def streamable_text(seq: Sequence) -> str:
        """The part of an unfinished sequence's text that no later token can change.

        Leaves out a trailing unfinished character and, when stop strings are set, the
        last ``len(longest stop) - 1`` characters, which may yet begin a stop string
        that is cut from the output.
        """
        text = seq.output_text.rstrip(_REPLACEMENT_CHAR)
        params = seq.sampling_params
        if params.stop and not params.include_stop_str_in_output:
            hold = max(len(s) for s in params.stop) - 1
            text = text[: max(0, len(text) - hold)]
        return text
