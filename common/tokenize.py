"""The one tokenizer, used byte for byte by training and by the preprocess worker.

Hangul runs are split into morphemes by a konlpy tagger; Latin words and numbers are
lower-cased words. The tagger (a JVM) is started lazily on the first Korean name, inside
the calling process: starting it before a fork hangs the child.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np

PAD_ID = 0
UNK_ID = 1
N_SPECIAL = 2  # ids 0 (pad) and 1 (unknown) precede the vocabulary

# a run of Hangul words (spaces inside kept) goes to the tagger in one call: JNI calls are costly
_HANGUL = re.compile(r"[\uac00-\ud7a3]+(?:\s+[\uac00-\ud7a3]+)*")
_LATIN_OR_DIGIT = re.compile(r"[a-z]+|[0-9]+")
_HANGUL_TOKEN = re.compile(r"^[\uac00-\ud7a3]+$")
# a Hangul word longer than any real one (kr_shop's longest: 25 characters) goes to the tagger cut to its first
# MAX_HANGUL_WORD: Okt's time grows with a word's length (400 characters 1.3 s, 1,000 characters 9.5 s), so one odd
# name must not cost a preprocess worker seconds. Names of real words tokenize as before
MAX_HANGUL_WORD = 40
_LONG_HANGUL_WORD = re.compile(rf"[\uac00-\ud7a3]{{{MAX_HANGUL_WORD + 1},}}")

# accented Latin is folded to its base letters: "été" was cut at each accent into "t" — a token the model reads as
# "T-shirt" (Myntra: Tshirts, confidence 1.0) — and is now "ete". Only what is neither ASCII nor Hangul is touched
# (canonical decomposition splits Hangul syllables); neither training set has such a letter, so models trained on
# them tokenize as before
_NEITHER_ASCII_NOR_HANGUL = re.compile(r"[^\x00-\x7f\uac00-\ud7a3]+")


def _fold_accents(text: str) -> str:
    return _NEITHER_ASCII_NOR_HANGUL.sub(
        lambda m: "".join(c for c in unicodedata.normalize("NFKD", m.group()) if not unicodedata.combining(c)), text)


TAGGERS = {"okt": "Okt", "komoran": "Komoran"}  # manifest name → konlpy.tag class
_taggers: dict[str, object] = {}
_tagger_lock = threading.Lock()


def _tagger(name: str):
    """One konlpy tagger per process and name, created on first use."""
    with _tagger_lock:
        if name not in _taggers:
            import konlpy.tag  # imported late: it starts a JVM

            _taggers[name] = getattr(konlpy.tag, TAGGERS[name])()
        return _taggers[name]


@dataclass(frozen=True)
class TokenizerConfig:
    """What the manifest stores under "tokenizer"."""

    max_tokens: int = 32
    korean_tagger: str = "okt"
    vocab: tuple[str, ...] = field(default=(), repr=False)
    # unseen tokens are hashed into this many extra ids (after the vocabulary), so
    # rare words still share a learned embedding instead of all collapsing onto UNK
    oov_buckets: int = 0

    def to_manifest(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "korean_tagger": self.korean_tagger,
            "oov_buckets": self.oov_buckets,
            "vocab": list(self.vocab),
        }

    @classmethod
    def from_manifest(cls, d: dict) -> "TokenizerConfig":
        """ValueError for what would tokenize wrongly, or fail on the first Korean name, rather than at load."""
        config = cls(
            max_tokens=_whole(d.get("max_tokens", 32), "max_tokens", 1),
            korean_tagger=d.get("korean_tagger", "okt"),
            oov_buckets=_whole(d.get("oov_buckets", 0), "oov_buckets", 0),
            vocab=tuple(d.get("vocab", ())),
        )
        if config.korean_tagger not in TAGGERS:
            raise ValueError(f"korean_tagger {config.korean_tagger!r}: expected one of {', '.join(TAGGERS)}")
        if not all(isinstance(tok, str) and tok for tok in config.vocab):
            raise ValueError("vocab: every entry must be a non-empty string")
        if len(set(config.vocab)) != len(config.vocab):
            raise ValueError("vocab: duplicate tokens")
        return config

    @functools.cached_property
    def fingerprint(self) -> int:
        """crc32 of the settings that decide token ids; travels in tensor records."""
        return zlib.crc32(json.dumps(self.to_manifest(), ensure_ascii=False).encode("utf-8"))

    @property
    def n_ids(self) -> int:
        """Size of the id space the embedding table must cover."""
        return N_SPECIAL + len(self.vocab) + self.oov_buckets


def _whole(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected a whole number ≥ {least}, got {value!r}")
    return value


class Tokenizer:
    def __init__(self, config: TokenizerConfig = TokenizerConfig()):
        self.config = config
        self._ids = {tok: i + N_SPECIAL for i, tok in enumerate(config.vocab)}

    def words(self, name: str, limit: int | None = None) -> list[str]:
        """Name → token strings (Korean morphemes and Latin/number words), in order.

        With `limit`, the first `limit` tokens, found without tagging what lies past them: each Hangul run costs a
        tagger call (a 1,000-character name of 250 runs took 28 ms, not 0.5), and a run of more than `limit`
        words goes to the tagger cut to its first `limit` (each word gives at least one morpheme; kr_shop's
        longest run has 26 words, so real names tokenize as without it)."""
        text = unicodedata.normalize("NFKC", name or "").lower()
        if not text.isascii():
            text = _fold_accents(text)
        tokens: list[str] = []
        pos = 0
        for m in _HANGUL.finditer(text):
            tokens += _LATIN_OR_DIGIT.findall(text[pos : m.start()])
            if limit is not None and len(tokens) >= limit:
                return tokens[:limit]
            run = m.group()
            if limit is not None and len(run_words := run.split()) > limit:
                run = " ".join(run_words[:limit])
            tokens += self._morphemes(run)
            pos = m.end()
        tokens += _LATIN_OR_DIGIT.findall(text[pos:])
        return tokens if limit is None else tokens[:limit]

    def _morphemes(self, hangul: str) -> list[str]:
        hangul = _LONG_HANGUL_WORD.sub(lambda m: m.group()[:MAX_HANGUL_WORD], hangul)
        morphs = _tagger(self.config.korean_tagger).morphs(hangul)
        return [m for m in morphs if _HANGUL_TOKEN.match(m)]

    def token_id(self, token: str) -> int:
        tid = self._ids.get(token)
        if tid is not None:
            return tid
        if self.config.oov_buckets:
            bucket = zlib.crc32(token.encode("utf-8")) % self.config.oov_buckets
            return N_SPECIAL + len(self.config.vocab) + bucket
        return UNK_ID

    def encode(self, name: str) -> np.ndarray:
        """Name → int32 ids, at most max_tokens, unpadded (the wire format pads)."""
        ids = [self.token_id(t) for t in self.words(name, self.config.max_tokens)]
        return np.asarray(ids, dtype=np.int32)

    def pad(self, ids_list: list[np.ndarray]) -> np.ndarray:
        """Variable-length id arrays → int64 [B, max_tokens], PAD_ID-filled (the model input)."""
        out = np.full((len(ids_list), self.config.max_tokens), PAD_ID, dtype=np.int64)
        for row, ids in zip(out, ids_list):
            row[: len(ids)] = ids[: self.config.max_tokens]
        return out

