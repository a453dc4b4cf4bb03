"""A tiny random-weight Llama with a real byte-level BPE tokenizer and a ChatML template, written
to a directory in about a second: the backbone of tests and benchmarks (never of real rankings)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)
GENERATION_PROMPT = f"{IM_START}assistant\n"

# The answers the verbalizer reads: each must be one token wherever the prompt builder puts it.
ANSWER_WORDS = (
    *(chr(c) for c in range(ord("A"), ord("Z") + 1)),
    *(str(d) for d in range(1, 6)),
    "Yes",
    "No",
)
# Where an answer word can stand in a prompt; "" is the word on its own.
ANSWER_CONTEXTS = ("", GENERATION_PROMPT, ", ", " ")

# The same ChatML layout as SmolLM2-Instruct, with a neutral default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROMPT_TEXT = """\
You are a movie recommender. The user has watched and rated the following movies.
Here is the watching history of the user, with the rating the user gave each movie
on a scale of 1 to 5:
Based on this history, predict the rating the user would give to the target movie.
Answer with a single number from 1 to 5. The rating is
The user liked these movies and disliked these movies.
Would the user prefer movie X over movie Y? Answer Yes or No.
Here are the candidate movies, each with an identifier letter.
Rank the candidate movies by how likely the user is to watch them next. Answer with the letters.
The hint from a recommender model: the predicted rating is 4. The model ranks the candidates as
The answer is Yes. The answer is No. The best candidate is A. The ranking is B, A, C, D, E.
History: Comedy, Drama, Action, Thriller, Romance, Adventure, Children's, Animation, Crime,
Documentary, Fantasy, Film-Noir, Horror, Musical, Mystery, Sci-Fi, War, Western, unknown genre.
The user rated this movie 1 star, 2 stars, 3 stars, 4 stars, 5 stars out of 5.
Which candidate should be recommended first? Which movie does the user like more?
"""

_TITLE_TEXT = """
Star Wars Return of the Jedi Toy Story Fargo Contact English Patient Scream Liar Air Force One
Independence Day Raiders Lost Ark Godfather Pulp Fiction Silence Lambs Twelve Monkeys Rock
Jerry Maguire Titanic Empire Strikes Back Fugitive Men in Black Mission Impossible Usual
Suspects Schindler's List Forrest Gump Braveheart Apollo Terminator Judgment Day Princess Bride
Back to Future Full Monty Good Will Hunting Game Heat Casablanca Vertigo Sense and Sensibility
Dances with Wolves Batman Returns Mighty Aphrodite Shawshank Redemption Twister Devil's
Advocate Conspiracy Theory Willy Wonka Chocolate Factory Monty Python Holy Grail Blade Runner
Alien Aliens Die Hard Leaving Las Vegas Rear Window Wizard Oz Clockwork Orange Manchurian
Candidate Amadeus Sound Music Birdcage Emma Speed Evita Jaws Lion King Aladdin Beauty Beast
Cinderella Snow White Seven Dwarfs Dead Man Walking Secrets Lies Trainspotting Wings Desire
Cold Comfort Farm City Lost Children Three Colors Red Blue White Big Night Kolya Shall We Dance
Ulee's Gold Gattaca Wag Dog Boogie Nights Jackie Brown Apt Pupil Kiss Girls Murder Time Kill
Lone Star Mother Nights Summer Winter Spring Autumn River Ocean Mountain Island Love Life Death
Dream Night Day Man Woman Boy Girl King Queen Prince House Home Street Road War Peace Last
First Little Big Great Good Bad Ugly Blood Fire Ice Dark Light Black White Golden Silver Secret
Story
"""

_COMMON_TEXT = """
about above after again against all also always among and another any around because been
before being below between both but came can come could did does doing down during each even
every few find for from give going had has have having her here him his how into its just keep
know like made make many may more most much must never new next now off often old only other
our out over own people place same see seem she should show since some still such take than
that their them then there these they thing think this those through time too under until upon
very want was way well were what when where which while who whom why will with without work
world would year years you young your action adventure animated classic comedy crime
documentary drama family fantasy feature film films horror movie movies music musical mystery
picture romance science fiction thriller western director actor actress cast scene sequel
series season episode release released watch watched watching rate rated rating ratings score
scores prefer preferred recommend recommended recommendation candidate candidates list order
rank ranked ranking history item items user users liked likes dislike disliked favorite enjoy
enjoyed similar predict predicted prediction answer question letter letters number numbers
target given following based between higher lower best worst first second third fourth fifth
"""
_TITLE_EXTRAS = (
    "Amélie",
    "Cidade de Deus",
    "Das Boot",
    "Léon",
    "Smilla's Sense of Snow",
    "Belle de jour",
    "La Cité des enfants perdus",
    "Crna mačka, beli mačor",
    "Nikita",
    "Ran",
    "Yojimbo",
)
_GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
_SYLLABLES = tuple(
    c + v
    for c in ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "")
    for v in ("a", "e", "i", "o", "u", "an", "er", "in", "on", "el")
)
# Every answer word in every context, repeated so that their merges come first.
_ANSWER_DRILL = " ".join(f"{w}, {w}\n{w}" for w in ANSWER_WORDS)
_ANSWER_REPEATS = 400


def build_tiny_model(
    dest: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    vocab_size: int = 2048,
) -> Path:
    """Writes a tiny random-weight LlamaForCausalLM + a real fast tokenizer (with a chat template)
    to `dest`, loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained(dest). Returns
    dest. Deterministic for a seed (the same files byte for byte).

    The tokenizer is a byte-level BPE (any text tokenizes without an unknown token) trained here on
    prompt-like and title-like text; "A".."Z", "1".."5", "Yes" and "No" are single tokens on their
    own and after the generation prompt, ", " or " ". The model's vocabulary is `vocab_size` rows;
    the tokenizer uses all of them.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    min_vocab = 256 + len(SPECIAL_TOKENS) + 2 * len(ANSWER_WORDS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least {min_vocab}")

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size, seed)
    tokenizer.save_pretrained(dest)

    # Grouped-query attention, as in SmolLM2, so that weight layouts (GGUF export, LoRA on k/v)
    # are exercised the way the real backbone uses them.
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(dest)
    # The generation config carries no timestamp but a transformers version; keep it (the loader
    # expects it) and write the other files deterministically.
    log.debug("Wrote a tiny Llama (%d parameters) to %s", model.num_parameters(), dest)
    return dest


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    title_words = _TITLE_TEXT.split()
    common_words = _COMMON_TEXT.split()
    lines = _PROMPT_TEXT.splitlines()
    # The chat template's role lines, as the prompts will carry them.
    lines += ["system\nYou are a helpful assistant.\nuser\n", "assistant\nA\nassistant\n4"] * 20
    lines += [_ANSWER_DRILL] * _ANSWER_REPEATS
    for i in range(1500):
        words = rng.sample(title_words, rng.randint(1, 4))
        title = " ".join(words)
        if i % 25 == 0:
            title = rng.choice(_TITLE_EXTRAS)
        if i % 7 == 0 and len(words) > 1:
            title = f"{title}, The"
        year = rng.randint(1922, 1998)
        genres = ", ".join(rng.sample(_GENRES, rng.randint(1, 3)))
        rating = rng.randint(1, 5)
        letter = chr(ord("A") + i % 26)
        lines.append(f"{letter}. {title} ({year}), {genres}; rated {rating}")
    for _ in range(600):
        lines.append(" ".join(rng.choices(common_words, k=12)).capitalize() + ".")
    # Made-up names (people, places, foreign titles) give the merges real titles need beyond the
    # word lists above.
    for _ in range(3000):
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        lines.append(f"{name.capitalize()} {rng.choice(title_words)} ({rng.randint(1900, 2025)})")
    return lines


def _build_tokenizer(vocab_size: int, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Digits one by one, as in SmolLM2's own tokenizer: " 4" is then "Ġ" + "4", the way the real
    # backbone reads a rating after a space, so code tested here meets the same token layout.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(seed), trainer=trainer)
    got = backend.get_vocab_size()
    if got != vocab_size:
        raise RuntimeError(
            f"the tiny tokenizer learned {got} tokens instead of {vocab_size}; the built-in corpus "
            "is too small for this vocab_size (use a smaller one)"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=ENDOFTEXT,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )
    broken = single_token_violations(tokenizer)
    if broken:
        raise RuntimeError(f"the tiny tokenizer splits answer words: {broken[:5]}")
    return tokenizer


def single_token_violations(tokenizer: Any) -> list[str]:
    """The answer words that `tokenizer` does not read as exactly one token in one of
    ANSWER_CONTEXTS, as `"context"|word` (see `backbone.answer_token_ids` for what counts);
    empty when the guarantee holds."""
    from recranker_core.errors import ConfigError
    from recranker_core.llm.backbone import answer_token_ids

    broken: list[str] = []
    for context in ANSWER_CONTEXTS:
        for word in ANSWER_WORDS:
            try:
                answer_token_ids(tokenizer, [word], context)
            except ConfigError:
                broken.append(f"{json.dumps(context)}|{word}")
    return broken


def write_tiny_gguf(model_dir: Path, dest: Path, *, quantization: str = "Q4_1") -> Path:
    """Write the Llama in `model_dir` (as `build_tiny_model` writes it) as a llama.cpp-style GGUF
    file at `dest`, laid out like the default SmolLM2 GGUF: a gpt2 byte-level vocabulary and,
    for "Q4_1", Q8_0 embeddings and Q4_1 linear layers; "F32" keeps every tensor exact. Returns
    dest. For tests of the GGUF loading path without the network."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    qtypes = {"Q4_1": GGMLQuantizationType.Q4_1, "F32": GGMLQuantizationType.F32}
    if quantization not in qtypes:
        raise ValueError(f"quantization must be one of {sorted(qtypes)}, not {quantization!r}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    weights = load_file(str(model_dir / "model.safetensors"))
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]

    by_id = {index: token for token, index in tok["model"]["vocab"].items()}
    control = {t["id"] for t in tok["added_tokens"] if t["special"]}
    for t in tok["added_tokens"]:
        by_id[t["id"]] = t["content"]
    tokens = [by_id[i] for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    token_id = {t: i for i, t in enumerate(tokens)}

    dest.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(dest), "llama")
    writer.add_name("recranker-tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_file_type(
        LlamaFileType.MOSTLY_Q4_1 if quantization == "Q4_1" else LlamaFileType.ALL_F32
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TokenType.CONTROL if i in control else TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(token_id[IM_START])
    writer.add_eos_token_id(token_id[IM_END])
    writer.add_unk_token_id(token_id[ENDOFTEXT])
    writer.add_pad_token_id(token_id[PAD])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def put(name: str, array: Any, qtype: GGMLQuantizationType) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)

    def permute(w: Any, n_head: int) -> Any:
        # llama.cpp stores q/k rows in its own rotary order (convert_hf_to_gguf.py's permute);
        # transformers undoes it when loading, so a file without it would load wrong.
        return (
            w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    linear = qtypes[quantization]
    embedding = GGMLQuantizationType.Q8_0 if quantization == "Q4_1" else linear
    put("token_embd.weight", weights["model.embed_tokens.weight"], embedding)
    put("output_norm.weight", weights["model.norm.weight"], GGMLQuantizationType.F32)
    if not config.get("tie_word_embeddings", False):
        put("output.weight", weights["lm_head.weight"], linear)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"], qtypes["F32"])
        put(
            f"blk.{i}.ffn_norm.weight",
            weights[p + "post_attention_layernorm.weight"],
            qtypes["F32"],
        )
        put(
            f"blk.{i}.attn_q.weight", permute(weights[p + "self_attn.q_proj.weight"], heads), linear
        )
        put(
            f"blk.{i}.attn_k.weight",
            permute(weights[p + "self_attn.k_proj.weight"], kv_heads),
            linear,
        )
        put(f"blk.{i}.attn_v.weight", weights[p + "self_attn.v_proj.weight"], linear)
        put(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"], linear)
        put(f"blk.{i}.ffn_gate.weight", weights[p + "mlp.gate_proj.weight"], linear)
        put(f"blk.{i}.ffn_up.weight", weights[p + "mlp.up_proj.weight"], linear)
        put(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"], linear)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
