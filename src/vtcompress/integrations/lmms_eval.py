"""lmms-eval model ``vtcompress``: any supported VLM family, compressed by any registered method (or a composition).

Registered through lmms-eval's entry point group ``lmms_eval.models`` (see ``pyproject.toml``), so after
``pip install vtcompress[lmms]``::

    lmms-eval --model vtcompress \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,budget=64 \\
        --tasks mme --batch_size 8 --output_path results/ --log_samples

``--model_args`` (comma-separated ``key=value``; lmms-eval turns numbers into int / float and true / false into
bool):

* ``pretrained`` (required): a model directory or Hugging Face id. Its config picks the stock transformers class
  (``config.architectures``); the family must be one vtcompress supports (:func:`vtcompress.models.adapter_for`).
  The processor is ``AutoProcessor`` and prompts use its chat template.
* ``method``: a registered name (``vtcompress list``), several joined by ``+`` to compose them
  (``visionzip+fastv``: one per stage group, as :func:`vtcompress.apply` takes a list), or ``none`` for the
  uncompressed model under the same prompts.
* ``budget``: the budget of every method that has no own one: an int is image tokens kept per image, a float in
  (0, 1] the fraction kept (``1.0`` is the uncompressed model; ``1`` keeps ONE token).
* ``NAME.KEY=VALUE``: a parameter of the method ``NAME`` of the list (``fastv.layer=3``, ``fastv.budget=0.5``,
  ``visionzip.dominant_ratio=0.8``); scalar values only.
* ``positions`` (``original`` | ``compact``): overrides the methods' position scheme (``vtcompress.apply``).
* ``device`` (default: ``cuda`` when available, else ``cpu``), ``device_map`` (e.g. ``auto``; default: none, the
  whole model on ``device``), ``dtype`` (``auto`` = the checkpoint's; ``float32`` / ``bfloat16`` /
  ``float16``), ``attn_implementation``, ``revision``, ``trust_remote_code``, ``max_new_tokens`` (default of
  tasks that set none: 256), ``batch_size`` (``--batch_size``).

Anything else, or a bad value, raises one ``ValueError`` naming it and what is allowed.

What each request type does:

* ``generate_until``: batched (``--batch_size``), left padding, any number of images per sample (0 included);
  requests are grouped by generation kwargs and sorted by prompt length; stop strings (``until``) cut the text.
* ``generate_until_multi_round``: lmms-eval's protocol (the task's ``doc_to_text`` builds round ``r``'s prompt
  and images from the previous answers and says when to stop); every round runs batched like
  ``generate_until``. The response is the list of round answers.
* ``loglikelihood``: ``(mean negative log-likelihood of the continuation tokens, is_greedy)``, the quantity
  lmms-eval's own LLaVA models return (its ``multiple_choice`` picks the ``argmin``). The context is the chat
  prompt with the images; the continuation's tokens are appended to its ids. One request at a time (unpadded,
  so every method numbers positions as in generation). Under compression the scored positions are the last
  ``n`` of the sequence the LLM sees (methods remove image tokens only, never text). Encoder- / projector-stage
  methods do not read the text: ``context + continuation`` runs in one forward. Decoder-stage methods choose
  their tokens from the prompt's last token(s) (FastV, PyramidDrop, SparseVLM, DART): the context runs first,
  so the choice is the one generation makes, and ``context + continuation`` then reuses that choice (an
  uncached continuation of the same prefill, see ``vtcompress.models.decoder``).

Per-sample records (``--log_samples``: the ``token_counts`` of each request) carry ``input_tokens``,
``output_tokens``, ``image_tokens`` (visual tokens of the uncompressed prompt), ``image_tokens_kept`` (those the
LLM's last layer still sees), ``flops_ratio`` (analytic prefill FLOPs vs uncompressed, from ``handle.summary()``;
``None`` where not modelled), ``method`` (each method with its budget) and ``versions`` (vtcompress, transformers,
torch). Multi-round responses are lists, which lmms-eval logs without counts. The run's results file carries the
``model_args`` (method, budget) in ``config``; lmms-eval 0.7.3 keeps only numbers in its run summary, so
``throughput`` has ``avg_image_tokens``, ``avg_image_tokens_kept``, ``avg_flops_ratio`` and ``avg_budget`` (each the
mean over the model's calls, one per request type, of that call's mean over its requests); the versions are in the
records and in the log line the model prints at start.

Responses are ``GenerationResult`` objects: lmms-eval 0.7.3's evaluator turns a plain ``(float, bool)``
loglikelihood pair into its string (``unwrap_generation_output``), which breaks ``multiple_choice`` for models
that return tuples; a ``GenerationResult`` passes its value through unchanged, with its record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


def manifest():
    """The entry point payload (group ``lmms_eval.models``): the model name ``vtcompress``.

    Defined before this module imports lmms-eval: importing this module first starts lmms-eval's model registry,
    which loads the entry points and so reads ``manifest`` from this module while it is still importing.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtcompress", simple_class_path=f"{__name__}.VTCompressLMM")


import torch  # noqa: E402
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.model_utils.gen_metrics import log_metrics  # noqa: E402
from loguru import logger  # noqa: E402
from PIL import Image  # noqa: E402

import vtcompress  # noqa: E402
from vtcompress.compressor import Compressor  # noqa: E402

__all__ = ["VTCompressLMM", "ModelSpec", "parse_model_args", "manifest"]

#: lmms-eval's placeholder for "an image goes here" in a context string
IMAGE_MARK = "<image>"
_MODEL_KEYS = ("pretrained", "method", "budget", "positions", "device", "device_map", "dtype", "attn_implementation",
               "revision", "trust_remote_code", "max_new_tokens", "batch_size", "max_batch_size")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


# ============================================================================== model_args
@dataclass(frozen=True)
class ModelSpec:
    """``--model_args`` checked and resolved: the methods are built, nothing is loaded yet."""

    pretrained: str
    methods: tuple[Compressor, ...]
    label: str  # "visionzip(budget=64)+fastv(budget=0.5)" or "none"
    positions: str | None = None
    device: str | None = None
    device_map: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    revision: str = "main"
    trust_remote_code: bool = False
    max_new_tokens: int = 256
    batch_size: int = 1


def _method_label(m: Compressor) -> str:
    budget = getattr(m, "budget", None)
    return f"{m.name}(budget={budget})" if budget is not None else str(m.name)


def parse_model_args(args: dict) -> ModelSpec:
    """``{"pretrained": ..., "method": "visionzip+fastv", "budget": 64, "fastv.layer": 2, ...}`` -> :class:`ModelSpec`.

    One ``ValueError`` names the first bad key or value and what is allowed.
    """
    args = dict(args)
    per_method: dict[str, dict] = {}
    for key in [k for k in args if "." in k]:
        name, _, param = key.partition(".")
        if not name or not param:
            raise ValueError(f"model_args key {key!r}: a method parameter is written NAME.KEY=VALUE "
                             "(e.g. fastv.layer=2)")
        per_method.setdefault(name, {})[param] = args.pop(key)
    unknown = sorted(set(args) - set(_MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model_args {', '.join(unknown)}; allowed: {', '.join(_MODEL_KEYS)}, and "
                         "NAME.KEY=VALUE for a parameter of the method NAME")
    pretrained = args.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError("model_args needs pretrained=DIR_OR_ID (a model directory or Hugging Face id)")
    method = args.get("method")
    if method is None:
        raise ValueError("model_args needs method=NAME (a registered method, several joined by '+', or 'none'); "
                         f"registered: {', '.join(vtcompress.list_methods())}")
    names = [n.strip() for n in str(method).split("+")]
    budget = args.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise ValueError(f"budget={budget!r}; allowed: an int (image tokens kept per image) or a float in (0, 1]")
    if names == ["none"]:
        if budget is not None or per_method:
            raise ValueError("method=none runs the uncompressed model: drop budget and NAME.KEY arguments")
        methods: list[Compressor] = []
    else:
        if "" in names or "none" in names or len(set(names)) != len(names):
            raise ValueError(f"method={method!r}: write registered names joined by '+' (each once), e.g. "
                             "visionzip+fastv, or 'none'")
        stray = sorted(set(per_method) - set(names))
        if stray:
            raise ValueError(f"model_args for {', '.join(stray)}.*, which is not in method={method!r}; write "
                             f"{names[0]}.KEY=VALUE for a parameter of {names[0]}")
        methods = []
        for n in names:
            params = dict(per_method.get(n, {}))
            if "budget" not in params and budget is not None:
                params["budget"] = budget
            try:
                methods.append(vtcompress.get(n, **params))
            except (TypeError, ValueError) as e:
                raise ValueError(f"method {n!r} with {params}: {e}") from None
    positions = args.get("positions")
    if positions not in (None, "original", "compact"):
        raise ValueError(f"positions={positions!r}; allowed: original, compact (default: each method's reference)")
    dtype = str(args.get("dtype", "auto"))
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(_DTYPES)}")
    ints = {}
    for k, default in (("batch_size", 1), ("max_new_tokens", 256)):
        v = args.get(k, default)
        v = default if v is None else v
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}={v!r}; allowed: a positive int")
        ints[k] = v
    trust = args.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ValueError(f"trust_remote_code={trust!r}; allowed: true, false")
    device_map = args.get("device_map")
    device_map = None if device_map in (None, "") else str(device_map)
    return ModelSpec(pretrained=pretrained, methods=tuple(methods),
                     label="+".join(_method_label(m) for m in methods) or "none", positions=positions,
                     device=None if args.get("device") is None else str(args["device"]), device_map=device_map,
                     dtype=dtype, attn_implementation=args.get("attn_implementation"),
                     revision=str(args.get("revision", "main")), trust_remote_code=trust, **ints)


# ============================================================================== records
@dataclass
class CompressionCounts(TokenCounts):
    """lmms-eval's per-request ``TokenCounts`` plus what compression did to the request (logged per sample)."""

    image_tokens: int | None = None
    image_tokens_kept: int | None = None
    flops_ratio: float | None = None
    method: str = ""
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(image_tokens=self.image_tokens, image_tokens_kept=self.image_tokens_kept,
                 flops_ratio=self.flops_ratio, method=self.method, versions=self.versions)
        return d


def _versions() -> dict[str, str]:
    import transformers

    return {"vtcompress": vtcompress.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


# ============================================================================== the model
class VTCompressLMM(lmms):
    """lmms-eval model running a stock Hugging Face VLM under :func:`vtcompress.apply` (see the module docstring)."""

    is_simple = True

    def __init__(self, **model_args) -> None:
        super().__init__()
        spec = parse_model_args(model_args)
        self.spec = spec
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(spec.pretrained, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
        cls = _model_class(config)
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code,
                  "dtype": "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        if spec.device_map:
            kwargs["device_map"] = spec.device_map
        model = cls.from_pretrained(spec.pretrained, **kwargs)
        if not spec.device_map:
            model = model.to(device)
        self._model = model.eval()
        self._device = next(model.parameters()).device
        self.processor = AutoProcessor.from_pretrained(spec.pretrained, revision=spec.revision,
                                                       trust_remote_code=spec.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size_per_gpu = spec.batch_size
        self.versions = _versions()
        self.methods = list(spec.methods)
        self.decoder_stage = any(m.stage == "decoder" for m in self.methods)
        # the handle lives as long as the model: installed in the calls below, removed after each
        # the processor reads the frame prompts of InternVL videos under a temporal method (elsewhere unused)
        self.handle = (vtcompress.apply(model, self.methods, positions=spec.positions, processor=self.processor)
                       if self.methods else None)
        if self.handle is not None:
            self.handle.remove()
        logger.info(f"vtcompress {self.versions['vtcompress']}: {cls.__name__} from {spec.pretrained}, "
                    f"method {spec.label}, transformers {self.versions['transformers']}, "
                    f"torch {self.versions['torch']}")

    # -------------------------------------------------------------------------------- lmms-eval properties
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -------------------------------------------------------------------------------- prompts
    def _docs(self, task, split):
        return self.task_dict[task][split]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        vis = doc_to_visual(self._docs(task, split)[doc_id]) if doc_to_visual is not None else []
        return _images(vis)

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat prompt of one user turn: the images where the context has ``<image>`` marks (as many as
        images), else first; then the text."""
        if n_images and context.count(IMAGE_MARK) == n_images:
            parts = context.split(IMAGE_MARK)
            content = [{"type": "text", "text": parts[0]}] if parts[0].strip() else []
            for p in parts[1:]:
                content.append({"type": "image"})
                if p.strip():
                    content.append({"type": "text", "text": p})
        else:
            if n_images and IMAGE_MARK in context:
                raise ValueError(f"the context has {context.count(IMAGE_MARK)} {IMAGE_MARK} marks for {n_images} "
                                 "images; write one per image or none (images first)")
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        conv = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{self.spec.pretrained} has no chat template (processor.chat_template); save one with "
                             "the processor (chat_template.jinja)")
        return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)

    def _encode(self, prompts: list[str], images: list[list]) -> dict:
        flat = [im for ims in images for im in ims]
        inputs = self.processor(text=prompts, images=flat or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        dtype = self.model.dtype
        for k in ("pixel_values", "pixel_values_videos"):
            if k in inputs:
                inputs[k] = inputs[k].to(dtype)
        return dict(inputs)

    def _compressing(self):
        """The apply block of one call (a no-op context for method=none)."""
        import contextlib

        return self.handle if self.handle is not None else contextlib.nullcontext()

    def _counts(self, rows: int, prompt_tokens: list[int], new_tokens: list[int],
                images: bool) -> list[CompressionCounts]:
        """Per-row records of the call just made under the handle (``images``: the call had some)."""
        if self.handle is None or not images:  # a text-only call runs the stock model (the summary is older)
            zero = {} if self.handle is None else {"image_tokens": 0, "image_tokens_kept": 0, "flops_ratio": 1.0}
            return [CompressionCounts(input_tokens=p, output_tokens=n, method=self.spec.label, versions=self.versions,
                                      **zero) for p, n in zip(prompt_tokens, new_tokens, strict=True)]
        s = self.handle.summary()
        out = []
        for i in range(rows):
            full = kept = ratio = None
            if s.samples == rows:
                full, kept = s.visual_full[i], s.visual_kept[i]
                if s.sample_flops and s.sample_flops_full[i]:
                    ratio = s.sample_flops[i] / s.sample_flops_full[i]
            out.append(CompressionCounts(input_tokens=prompt_tokens[i], output_tokens=new_tokens[i],
                                         image_tokens=full, image_tokens_kept=kept, flops_ratio=ratio,
                                         method=self.spec.label, versions=self.versions))
        return out

    def _log_run(self, counts: list[CompressionCounts], elapsed: float, new_tokens: int) -> None:
        extra = {"total_requests": len(counts)}
        with_img = [c for c in counts if c.image_tokens is not None]
        if with_img:
            extra["image_tokens"] = sum(c.image_tokens for c in with_img) / len(with_img)
            extra["image_tokens_kept"] = sum(c.image_tokens_kept for c in with_img) / len(with_img)
        ratios = [c.flops_ratio for c in counts if c.flops_ratio is not None]
        if ratios:
            extra["flops_ratio"] = sum(ratios) / len(ratios)
        budgets = {getattr(m, "budget", None) for m in self.methods}
        if len(budgets) == 1 and isinstance(next(iter(budgets)), (int, float)):
            extra["budget"] = float(next(iter(budgets)))
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)

    # -------------------------------------------------------------------------------- generation
    def _generate(self, prompts: list[str], images: list[list], gen_kwargs: dict):
        """Greedy / sampled generation of one batch -> (texts, counts)."""
        gen = dict(gen_kwargs)
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation kwarg until={until!r}; allowed: a string or a list of strings")
        max_new = int(gen.pop("max_new_tokens", self.spec.max_new_tokens))
        temperature = float(gen.pop("temperature", 0) or 0)
        do_sample = bool(gen.pop("do_sample", False)) or temperature > 0
        top_p = gen.pop("top_p", None)
        num_beams = int(gen.pop("num_beams", 1) or 1)
        gen.pop("image_aspect_ratio", None)
        call = {"max_new_tokens": max_new, "do_sample": do_sample, "num_beams": num_beams}
        if do_sample:
            call["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                call["top_p"] = float(top_p)
        if gen:  # anything else a task sets must be a generate() option (repetition_penalty, top_k, ...)
            from transformers import GenerationConfig

            known = GenerationConfig()
            unknown = sorted(k for k in gen if not hasattr(known, k))
            if unknown:
                raise ValueError(f"generation kwargs {unknown} are not generate() options; allowed: until, "
                                 "max_new_tokens, temperature, top_p, num_beams, do_sample and GenerationConfig fields")
            call.update(gen)
        inputs = self._encode(prompts, images)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        with torch.inference_mode(), self._compressing():
            out = self.model.generate(**inputs, pad_token_id=pad, **call)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, t in enumerate(texts):
            for u in until:
                if u and u in t:
                    t = t.split(u, 1)[0]
            texts[i] = t
        n_new = (new != pad).sum(1).tolist()
        n_prompt = inputs["attention_mask"].sum(1).tolist()
        return texts, self._counts(len(prompts), n_prompt, n_new, any(images))

    def _batches(self, items: list, key):
        """Indices of ``items`` grouped by ``key(item)`` (generation kwargs), longest prompt first, in batches."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(key(it), []).append(i)
        for idx in groups.values():
            idx.sort(key=lambda i: -len(items[i][0]))
            for s in range(0, len(idx), self.batch_size):
                yield idx[s:s + self.batch_size]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        args = [r.args for r in requests]
        res: list[GenerationResult | None] = [None] * len(args)
        t0, new_total, all_counts = time.perf_counter(), 0, []
        for batch in self._batches(args, key=lambda a: json.dumps(a[1], sort_keys=True, default=str) + a[4] + a[5]):
            prompts, images = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = args[i]
                vis = self._visuals(doc_to_visual, task, split, doc_id)
                images.append(vis)
                prompts.append(self._prompt(context, len(vis)))
            texts, counts = self._generate(prompts, images, args[batch[0]][1])
            for i, t, c in zip(batch, texts, counts, strict=True):
                res[i] = GenerationResult(text=t, token_counts=c)
                new_total += c.output_tokens
            all_counts += counts
        self._log_run(all_counts, time.perf_counter() - t0, new_total)
        return res

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        args = [r.args for r in requests]
        res: list[list[str] | None] = [None] * len(args)
        t0, new_total, all_counts = time.perf_counter(), 0, []
        for batch in self._batches(args, key=lambda a: json.dumps(a[1], sort_keys=True, default=str) + a[5] + a[6]):
            contexts = {i: args[i][0] for i in batch}
            visuals = {i: self._visuals(args[i][2], args[i][5], args[i][6], args[i][4]) for i in batch}
            rounds = {i: [] for i in batch}
            info = {i: None for i in batch}
            active, round_idx = list(batch), 0
            while active:
                if round_idx > 0:
                    still = []
                    for i in active:
                        _, _, _, doc_to_text, doc_id, task, split = args[i]
                        vis, ctx, done, round_res, info[i] = doc_to_text(
                            self._docs(task, split)[doc_id], previous_output=list(rounds[i]), round_idx=round_idx,
                            previous_round_info=info[i])
                        rounds[i] = list(round_res) if round_res is not None else rounds[i]
                        if not done:
                            contexts[i], visuals[i] = ctx, _images(vis)
                            still.append(i)
                    active = still
                    if not active:
                        break
                prompts = [self._prompt(contexts[i], len(visuals[i])) for i in active]
                texts, counts = self._generate(prompts, [visuals[i] for i in active], args[batch[0]][1])
                for i, t in zip(active, texts, strict=True):
                    rounds[i].append(t.strip())
                new_total += sum(c.output_tokens for c in counts)
                all_counts += counts
                round_idx += 1
            for i in batch:
                res[i] = rounds[i]
        self._log_run(all_counts, time.perf_counter() - t0, new_total)
        return res

    # -------------------------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        # a GenerationResult carrying the (NLL, is_greedy) pair: lmms-eval 0.7.3 would stringify a plain tuple
        res: list[GenerationResult] = []
        t0, all_counts = time.perf_counter(), []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            cont = target if isinstance(target, str) else target(self._docs(task, split)[doc_id])
            if isinstance(cont, list):
                cont = cont[0]
            vis = self._visuals(doc_to_visual, task, split, doc_id)
            score, counts = self._score(self._prompt(context, len(vis)), str(cont), vis)
            res.append(GenerationResult(text=score, token_counts=counts))
            all_counts.append(counts)
        self._log_run(all_counts, time.perf_counter() - t0, 0)
        return res

    def _score(self, prompt: str, cont: str, images: list) -> tuple[tuple[float, bool], CompressionCounts]:
        """One request: ``(mean NLL of the continuation tokens, is_greedy)`` and its record.

        One request at a time, unpadded: the positions a method's reference gives (compact or original) are then
        those of generation, and the continuation is the last ``n`` tokens of every layer's sequence.
        """
        ctx = self._encode([prompt], [images])
        cont_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not cont_ids:
            raise ValueError(f"an empty continuation cannot be scored: {cont!r}")
        n = len(cont_ids)
        tail = torch.tensor([cont_ids], dtype=torch.long, device=self.device)
        full = dict(ctx)
        full["input_ids"] = torch.cat([ctx["input_ids"], tail], 1)
        full["attention_mask"] = torch.cat([ctx["attention_mask"], torch.ones_like(tail)], 1)
        if "mm_token_type_ids" in ctx:  # the continuation is text (type 0)
            full["mm_token_type_ids"] = torch.cat([ctx["mm_token_type_ids"], torch.zeros_like(tail)], 1)
        with torch.inference_mode(), self._compressing():
            if self.decoder_stage:
                # decoder-stage methods choose from the prompt's last token(s): decide on the context, as generation
                # does, then score context + continuation as an uncached continuation of that prefill (same choice)
                self.model(**ctx, logits_to_keep=1)
                logits = self.model(**full, use_cache=False).logits
            else:
                logits = self.model(**full).logits
            (counts,) = self._counts(1, [int(full["input_ids"].shape[1])], [n], bool(images))
        lp = torch.log_softmax(logits[0, -n - 1:-1].float(), dim=-1)  # [n, V]: the predictions of the n tokens
        target = tail[0].to(lp.device)
        nll = -lp.gather(1, target[:, None]).squeeze(1)
        return (float(nll.mean()), bool((lp.argmax(-1) == target).all())), counts


def _model_class(config):
    """The stock transformers class of ``config`` (``config.architectures``), checked against vtcompress's families
    on a meta-device instance (no weights read)."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        cls = transformers.AutoModelForImageTextToText._model_mapping.get(type(config), None)
    if cls is None:
        raise ValueError(f"no transformers class for {type(config).__name__} (architectures={archs}); supported "
                         f"families: {', '.join(vtcompress.models.supported_families())}")
    with torch.device("meta"):
        probe = cls(config)
    try:
        vtcompress.models.adapter_for(probe)
    except ValueError as e:
        raise ValueError(f"pretrained model {cls.__name__}: {e}") from None
    return cls


def _images(vis) -> list:
    """``doc_to_visual``'s output -> a list of PIL images (videos are refused, not skipped)."""
    if vis is None:
        return []
    vis = list(vis) if isinstance(vis, (list, tuple)) else [vis]
    out = []
    for v in vis:
        if isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        else:
            raise ValueError(f"the vtcompress lmms-eval model takes images (PIL); got {type(v).__name__} "
                             f"{str(v)[:80]!r} (videos and audio are not supported)")
    return out

