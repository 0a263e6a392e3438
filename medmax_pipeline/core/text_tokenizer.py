"""The Chameleon text tokenizer: building one with the real id layout, loading, checking, encoding.

The checkpoint folder holds two HF `tokenizers` BPE files: tokenizer/text_tokenizer.json and
tokenizer/text_tokenizer_modified.json (the same, with <reserved08707> renamed to <image>).
Ids 0..8711 follow the Chameleon layout (MEDMAX-FACTS.md). Image-code tokens are named IMGIMG +
one letter per decimal digit of the code (A=0 ... J=9) + a final letter, so code 53 is IMGIMGFDZ
at id 57. Reserved tokens are named <reservedNNNNN> with NNNNN = id - 4; in Chameleon's real
vocabulary they go on well past id 8800 (<reserved08799> is id 8803, <reserved09000> id 9004), so
"is this text?" is answered from the tokenizer's own names and added tokens (special_token_ids),
never from an id bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from medmax_pipeline.core import constants as C

IMAGE_NAME_PREFIX = "IMGIMG"
TOKENIZER_FILE = "text_tokenizer.json"
MODIFIED_TOKENIZER_FILE = "text_tokenizer_modified.json"
# layout_tokens covers ids 0..LAYOUT_LAST_ID; the demo tokenizer adds DEMO_RESERVED_PAST_LAYOUT more
# reserved tokens right after them (ids 8800..), as the real vocabulary has, so that code which
# assumed "text starts at 8800" fails the tests.
LAYOUT_LAST_ID = 8799
DEMO_RESERVED_PAST_LAYOUT = 32


class TokenizerLayoutError(ValueError):
    """A tokenizer does not have the Chameleon id layout the pipeline relies on."""


def image_token_name(code: int) -> str:
    if not 0 <= code < C.NUM_IMAGE_CODES:
        raise ValueError(f"image code {code} outside [0, {C.NUM_IMAGE_CODES - 1}]")
    return IMAGE_NAME_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_from_image_token_name(name: str) -> int | None:
    """The VQGAN code an IMGIMG token name spells, or None when the name is not of that form."""
    body = name[len(IMAGE_NAME_PREFIX) : -1]
    if not name.startswith(IMAGE_NAME_PREFIX) or not body or any(not "A" <= ch <= "J" for ch in body):
        return None
    return int("".join(str(ord(ch) - ord("A")) for ch in body))


def reserved_token_name(token_id: int) -> str:
    return f"<reserved{token_id - C.IMAGE_CODE_OFFSET:05d}>"


def layout_tokens(modified: bool) -> list[str]:
    """Token strings for ids 0..LAYOUT_LAST_ID, in id order."""
    tokens = [C.BOS_TOKEN, C.PAD_TOKEN, C.EOS_TOKEN, "<unk>"]
    tokens += [image_token_name(code) for code in range(C.NUM_IMAGE_CODES)]
    tokens += [C.END_IMAGE_TOKEN, C.BEGIN_IMAGE_TOKEN]
    for token_id in range(C.BEGIN_IMAGE_ID + 1, LAYOUT_LAST_ID + 1):
        name = reserved_token_name(token_id)
        if modified and token_id == C.IMAGE_PLACEHOLDER_ID:
            name = C.IMAGE_PLACEHOLDER_TOKEN
        tokens.append(name)
    assert tokens[C.SEPARATOR_ID] == C.SEPARATOR_TOKEN
    return tokens


def build_chameleon_tokenizer(
    out_dir: str | Path, corpus: Iterable[str], text_vocab_size: int = 2000,
    reserved_past_layout: int = DEMO_RESERVED_PAST_LAYOUT,
) -> tuple[Path, Path]:
    """Train a small byte-level BPE on `corpus` and save both tokenizer files with the Chameleon layout.

    `reserved_past_layout` more <reserved…> tokens follow id LAYOUT_LAST_ID before the text tokens.
    Returns the paths of text_tokenizer.json and text_tokenizer_modified.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = layout_tokens(modified=False)
    specials += [reserved_token_name(i) for i in range(LAYOUT_LAST_ID + 1, LAYOUT_LAST_ID + 1 + reserved_past_layout)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + text_vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    plain_path = out_dir / TOKENIZER_FILE
    modified_path = out_dir / MODIFIED_TOKENIZER_FILE
    plain_json = json.loads(tokenizer.to_str())
    plain_path.write_text(json.dumps(plain_json, ensure_ascii=False))
    modified_path.write_text(json.dumps(_rename_token(plain_json, C.IMAGE_PLACEHOLDER_ID, C.IMAGE_PLACEHOLDER_TOKEN), ensure_ascii=False))
    for path, modified in ((plain_path, False), (modified_path, True)):
        check_tokenizer_layout(load_tokenizer(path), require_image_placeholder=modified, source=str(path))
    return plain_path, modified_path


def _rename_token(tokenizer_json: dict, token_id: int, new_name: str) -> dict:
    renamed = json.loads(json.dumps(tokenizer_json))
    for added in renamed["added_tokens"]:
        if added["id"] == token_id:
            added["content"] = new_name
    vocab = renamed["model"]["vocab"]
    old_name = next(name for name, i in vocab.items() if i == token_id)
    renamed["model"]["vocab"] = {(new_name if name == old_name else name): i for name, i in vocab.items()}
    return renamed


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise TokenizerLayoutError(f"{path} is not a HF tokenizers JSON file: {exc}") from exc


def vocabulary_map(tokenizer: Tokenizer | str | Path) -> dict[str, int]:
    """Token name -> id, as HF's ChameleonConfig.vocabulary_map holds it."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return dict(sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))


def check_vocabulary_map(vocab: dict[str, int], require_image_placeholder: bool = True, source: str = "tokenizer") -> None:
    """Raise TokenizerLayoutError naming the first id where `vocab` breaks the Chameleon layout."""
    by_id = {i: name for name, i in vocab.items()}
    expected = {
        C.BOS_ID: C.BOS_TOKEN,
        C.PAD_ID: C.PAD_TOKEN,
        C.EOS_ID: C.EOS_TOKEN,
        C.END_IMAGE_ID: C.END_IMAGE_TOKEN,
        C.BEGIN_IMAGE_ID: C.BEGIN_IMAGE_TOKEN,
        C.SEPARATOR_ID: C.SEPARATOR_TOKEN,
    }
    if require_image_placeholder:
        expected[C.IMAGE_PLACEHOLDER_ID] = C.IMAGE_PLACEHOLDER_TOKEN
    problems: list[tuple[int, str]] = []
    for token_id in range(C.FIRST_IMAGE_TOKEN_ID, C.LAST_IMAGE_TOKEN_ID + 1):
        name = by_id.get(token_id)
        code = code_from_image_token_name(name) if name is not None else None
        if code is None or code != token_id - C.IMAGE_CODE_OFFSET:
            problems.append((token_id, f"expected an IMGIMG name spelling code {token_id - C.IMAGE_CODE_OFFSET}, found {name!r}"))
    for token_id, name in expected.items():
        if by_id.get(token_id) != name:
            problems.append((token_id, f"expected {name!r}, found {by_id.get(token_id)!r}"))
    # An IMGIMG name anywhere else would let text decode into image codes.
    for name, token_id in vocab.items():
        if code_from_image_token_name(name) is not None and not C.FIRST_IMAGE_TOKEN_ID <= token_id <= C.LAST_IMAGE_TOKEN_ID:
            problems.append((token_id, f"image token name {name!r} outside the image block"))
    if problems:
        token_id, reason = min(problems)
        raise TokenizerLayoutError(
            f"{source}: id {token_id}: {reason} ({len(problems)} mismatching id(s); the +4 image offset "
            "and special ids of MEDMAX-FACTS.md do not hold for this tokenizer)"
        )


def check_tokenizer_layout(tokenizer: Tokenizer, require_image_placeholder: bool = True, source: str = "tokenizer") -> None:
    check_vocabulary_map(vocabulary_map(tokenizer), require_image_placeholder, source)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """BPE ids of `text` without bos/eos; each literal <image> becomes 8711 (modified tokenizer)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch form of encode_text; the Rust tokenizer uses every core."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def is_special_token_name(name: str) -> bool:
    """A name of the special/reserved kind: `<…>` (<s>, </s>, <pad>, <reservedNNNNN>, <image>, …)."""
    return len(name) > 2 and name.startswith("<") and name.endswith(">")


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids that are not text: image-code tokens, `<…>`-named tokens and added special tokens."""
    ids = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    for name, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if is_special_token_name(name) or code_from_image_token_name(name) is not None:
            ids.add(token_id)
    return frozenset(ids)


def decode_text(tokenizer: Tokenizer, ids: Iterable[int], special_ids: frozenset[int] | None = None) -> str:
    """The text of `ids`, leaving out every non-text id (special_token_ids; pass it in when decoding
    many sequences with one tokenizer, it walks the whole vocabulary)."""
    if special_ids is None:
        special_ids = special_token_ids(tokenizer)
    return tokenizer.decode([int(i) for i in ids if int(i) not in special_ids], skip_special_tokens=False)
