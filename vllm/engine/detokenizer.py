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

    def check_stop_strings(self, seq: Sequence) -> str | None:
        """Decode the output so far; on a stop string, truncate ``output_text`` and return it."""
        params = seq.sampling_params
        text = self._decode(seq, seq.output_token_ids)
        # Only the new tail can hold a stop string that was not there last step.
        search_from = max(0, len(seq.output_text) - max(len(s) for s in params.stop))
        seq.output_text = text
        hits = [(text.find(s, search_from), s) for s in params.stop]
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
