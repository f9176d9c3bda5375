"""Output text and stop strings."""

from __future__ import annotations

from vllm.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, seq: Sequence, token_ids: list[int]) -> str:
        params = seq.sampling_params
        if not params.detokenize or self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def check_stop_strings(self, seq: Sequence, can_stop: bool = True) -> str | None:
        """Decode the output so far; on a stop string, truncate ``output_text`` and return it.

        With ``can_stop`` False (before ``min_tokens``) only the text advances, so a stop
        string generated then is never found later.
        """
        params = seq.sampling_params
        text = self._decode(seq, seq.output_token_ids)
        # Text searched last step holds no stop string; only one ending in the new tail can.
        # A trailing U+FFFD is an unfinished character the new token may complete.
        searched = len(seq.output_text.rstrip("\ufffd"))
        seq.output_text = text
        if not can_stop:
            return None
        hits = [(text.find(s, max(0, searched - len(s) + 1)), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        seq.output_text = (
            text[: index + len(stop)] if params.include_stop_str_in_output else (text[:index])
        )
        return stop

    def output_text(self, seq: Sequence) -> str:
        """Final text: a stop string or stop token is left out unless asked for."""
        params = seq.sampling_params
        if isinstance(seq.stop_reason, str):
            return seq.output_text
        tokens = seq.output_token_ids
        if (
            seq.status.finish_reason == "stop"
            and tokens
            and tokens[-1] in params.all_stop_token_ids
            and not params.include_stop_str_in_output
        ):
            tokens = tokens[:-1]
        seq.output_text = self._decode(seq, tokens)
        return seq.output_text
