"""An lm-eval ``TemplateLM`` around a live, in-process model (no model path, no second copy of the weights).

``LiveLM(model, tok)`` scores requests the way lm-eval's own ``HFLM`` does (same tokenisation, same
``(context + continuation)[-(max_length + 1):][:-1]`` inputs, right padding, log-softmax over the vocabulary), so
per-request log-likelihoods agree with ``HFLM(pretrained=model, tokenizer=tok)``.

Distribution: ``LiveLM`` reports ``rank = 0`` and ``world_size = 1`` to lm-eval, so on every rank lm-eval builds
the full request list; ``LiveLM`` then splits the work itself. Requests are sorted by length and cut into batches,
batches are dealt round-robin over the ranks of the default process group, ranks with fewer batches run dummy
batches (one short request whose result is dropped) so every rank makes the same number of forward passes (ZeRO-3
needs that), and results are all-gathered. Every rank therefore returns, and lm-eval aggregates, identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from mora_dist.evaluation.distributed import batches, deal_batches, gather_indexed, rank_and_world
from mora_dist.evaluation.generation import generate_texts

Request = tuple[tuple[str, str], list[int], list[int]]


class LiveLM(TemplateLM):
    """lm-eval model interface for a Hugging Face causal LM object already in memory.

    Args:
        model: the causal LM (kept in eval mode while scoring).
        tok: its tokenizer.
        batch_size: requests per forward pass (per rank).
        max_length: longest input in tokens; defaults to the model's ``max_position_embeddings`` (capped at 2048,
            as ``HFLM`` does when the tokenizer gives no limit).
        max_gen_toks: default generation budget of ``generate_until`` requests.
        synced_gpus: passed to ``generate`` (set under ZeRO-3).
        add_bos_token: as ``HFLM``'s argument: ``None`` keeps the tokenizer's default special tokens.
    """

    def __init__(self, model, tok, batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 synced_gpus: bool = False, add_bos_token: bool | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tok
        self.batch_size = int(batch_size)
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._max_length = int(max_length or min(cfg_len or 2048, 2048))
        self.max_gen_toks = max_gen_toks
        self.synced_gpus = synced_gpus
        self.add_bos_token = add_bos_token
        self._rank, self._world_size = 0, 1  # lm-eval must not shard: this class shards itself
        # config, not the weight's shape: under ZeRO-3 the local weight is an empty partition.
        self.vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", None) or len(tok))

    # ------------------------------------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self) -> int:
        """End-of-text id: the tokenizer's EOS."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Context used for empty-context requests: BOS when the tokenizer has one, else EOS (as ``HFLM``)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Longest model input in tokens."""
        return self._max_length

    @property
    def device(self):
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        """Tokenizer name, used by lm-eval to fingerprint chat-templated request caches."""
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; special tokens as ``HFLM.tok_encode`` adds them."""
        kw: dict = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        bos_text = self.tokenizer.bos_token
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a chat with the tokenizer's template (used by lm-eval when ``apply_chat_template`` is on)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score_inputs(self, inps: list[tuple[int, ...]], conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """One right-padded forward over ``inps``; for each input, score each continuation ending at its end."""
        width = max(len(x) for x in inps)
        batch = torch.zeros(len(inps), width, dtype=torch.long)
        for i, inp in enumerate(inps):
            batch[i, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = self.model(batch.to(self.device)).logits
        logits = logits[..., :self.vocab_size]
        logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).cpu()
        out = []
        for row, inp, cont_list in zip(logprobs, inps, conts):
            scored = []
            for cont in cont_list:
                piece = row[len(inp) - len(cont):len(inp)]
                target = torch.tensor(cont, dtype=torch.long)
                greedy = bool((piece.argmax(dim=-1) == target).all())
                scored.append((float(piece.gather(1, target[:, None]).sum()), greedy))
            out.append(scored)
        return out

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` per request, computed across ranks.

        Requests whose model input ``(context + continuation)[:-1]`` is identical (e.g. the four one-letter
        answers of an MMLU question) share one forward pass, like ``HFLM``'s ``logits_cache``.
        """
        if not requests:
            return []
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("loglikelihood request with empty context or continuation tokens")
            groups.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
        inps = list(groups)
        order = sorted(range(len(inps)), key=lambda k: (-len(inps[k]), inps[k]))
        rank, world = rank_and_world()
        was_training = self.model.training
        self.model.eval()
        local: list[tuple[int, tuple[float, bool]]] = []
        try:
            for batch in deal_batches(batches(order, self.batch_size), rank, world):
                if batch is None:  # dummy forward keeps ranks in step
                    self._score_inputs([(self.prefix_token_id,)], [[[self.prefix_token_id]]])
                    continue
                conts = [[requests[i][2] for i in groups[inps[k]]] for k in batch]
                scored = self._score_inputs([inps[k] for k in batch], conts)
                for k, results in zip(batch, scored):
                    local += list(zip(groups[inps[k]], results))
        finally:
            self.model.train(was_training)
        results = gather_indexed(local, len(requests))
        for (pair, _, _), res in zip(requests, results):
            if self.cache_hook is not None and pair[0] is not None:
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` tokens (perplexity tasks)."""
        windows: list[Request] = []
        owners: list[int] = []
        for idx, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append(((None, None), ctx, cont))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string or ``max_gen_toks``; requests grouped by generation settings."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, tuple[list[str], int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_toks = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            key = (tuple(until), max_toks)
            groups.setdefault(key, []).append(i)
            settings[key] = (until, max_toks)
        out: list[str] = [""] * len(requests)
        for key in sorted(groups, key=repr):  # same group order on every rank
            idxs = groups[key]
            until, max_toks = settings[key]
            texts = generate_texts(
                self.model, self.tokenizer, [requests[i].args[0] for i in idxs], max_new_tokens=max_toks,
                batch_size=self.batch_size, stop=until, synced_gpus=self.synced_gpus,
                max_prompt_tokens=self.max_length - max_toks)
            for i, text in zip(idxs, texts):
                out[i] = text
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
