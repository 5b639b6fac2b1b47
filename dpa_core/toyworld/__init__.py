"""Toy world: a seeded synthetic world with tiny models, so the whole DPA study runs offline on a
laptop CPU in minutes.

    from dpa_core.toyworld import build_world
    manifest = build_world("data/toyworld", size="smoke", seed=0, overrides={"llm_steps": 50})
    # or: python -m dpa_core.toyworld --out data/toyworld --size smoke --seed 0 --set llm_steps=50

Layout of OUT: images/{train,bench}/*.png, captions/{terse,verbose}.json, instruct/train.json
(LLaVA format, image paths relative to OUT/images), bench/toy_mcq.tsv (VLMEvalKit MCQ, plus a
scene_text column: the scene in own-style words, for the text-oracle ceiling),
heldout/captions_{terse,verbose}.json (both styles for the benchmark scenes, images bench/*.png) and
heldout/content_words.json (for the image-reliance diagnostic), text_bench/facts.jsonl, models/llm (Qwen2ForCausalLM + tokenizer with a ChatML template),
models/clip (CLIPModel + CLIPImageProcessor), metrics/prior_gap.json, manifest.json.

Why the world looks like this
-----------------------------
What DPA claims is about language, not vision: when the caption set's register differs from the
LLM's own, a frozen LLM cannot absorb the style, so the connector (the only trainable part in
alignment) is pushed to carry style instead of visual content. The world is built so that this
situation exists, can be measured, and is not rigged either way:

1. Vision is easy and fully specified. Scenes are 1-4 objects (4 shapes, 6 colours, 2 sizes, a 3x3
   grid of positions; shapes and colours unique within a scene, so every question has one answer).
   Everything said about an image is derived from its Scene, so captions are never wrong, and
   every answer is checkable. A small CLIP learns this well; the bottleneck is the connector.
2. The base LLM has a prior of its own. It is pretrained here on a corpus in one plain register
   (full descriptions and short mentions of scenes, as text only; plain facts; ChatML chats that
   answer questions about scenes given in words, open-ended and multiple-choice). It thus knows
   the content words and the answer formats, but has never seen an image. Its first steps are
   first lessons on one-object scenes, where copying a word out of the context is the only way
   to answer: without them it never learned to read a colour or a shape from its context.
3. Two caption sets differ in register and in content, like the paper's BLIP-LCS vs ShareGPT4V:
   `terse` is alt-text close to the LLM's register but leaves out positions, counts and
   relations; `verbose` carries every fact (more visual content: the "high-quality" set) inside
   florid prose whose style words ("Verily", "doth", "resplendent") never occur in the LLM's
   corpus. The style is drawn from small closed sets independent of the image: learnable from
   text alone (what the proxy LLM does) but not predictable from pixels, so loss on it is pure
   language-prior conflict. Content words are identical across registers, so a connector aligned
   on either set points at the words the instruction data uses.
4. The tokenizer is trained on all of the world's text, so the verbose register is unfamiliar to
   the LLM because it never saw it used, not because it falls apart into bytes.
5. The conflict is measured, not assumed: metrics/prior_gap.json holds the base LLM's perplexity
   on held-out own-style text, terse and verbose captions, and the share of loss on non-visual
   tokens (the paper's word-level analysis). By default the verbose register is absent from the
   LLM's corpus (the sharpest conflict); the size field n_llm_florid_docs mixes some verbose
   text into it, a dial for the conflict's strength (a real LLM has read some florid prose).
   Nothing here is tuned on DPA's results: the sizes are set by the time budget and by the base
   models' own sanity checks (manifest "checks"), and the study reports whatever the arms do.
6. Held-out evaluation: benchmark scenes are drawn first and their content (not only their
   pixels) is excluded from every training image and from the LLM's corpus; benchmark questions
   cover colour, shape, position, count and relation. The text benchmark asks the plain facts,
   to see whether multimodal training erodes what the LLM knew.
7. Determinism: every random choice in the data comes from a named random.Random stream of the
   seed, images are drawn with integer geometry, so the same seed gives the same data bytes;
   models are trained with seeded torch on CPU (metrics equal within float tolerance).
"""

from .build import build_base_models, build_world
from .sizes import SIZES, WorldSize, resolve_size

__all__ = ["build_base_models", "build_world", "SIZES", "WorldSize", "resolve_size"]
