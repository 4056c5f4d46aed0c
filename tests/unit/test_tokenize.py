import numpy as np

from common.tokenize import N_SPECIAL, PAD_ID, UNK_ID, Tokenizer, TokenizerConfig


def test_latin_words_lowercased_numbers_split():
    assert Tokenizer().words("Turtle Check Men Navy-Blue SHIRT 2XL") == ["turtle", "check", "men", "navy", "blue", "shirt", "2", "xl"]


def test_korean_morphemes_and_latin_in_one_name():
    words = Tokenizer().words("콜라겐원단 여성브라 Nike 운동화")
    assert "nike" in words
    assert "콜라겐" in words and "원단" in words  # a compound split into morphemes
    assert "여성" in words and "운동화" in words
    assert all(w.strip() for w in words)


def test_fullwidth_and_empty_input():
    t = Tokenizer()
    assert t.words("ＮＩＫＥ") == ["nike"]
    assert t.words("") == [] and t.words(None) == []


def test_encode_uses_vocab_unk_and_oov_buckets():
    cfg = TokenizerConfig(max_tokens=4, vocab=("blue", "shirt"))
    t = Tokenizer(cfg)
    assert t.encode("Blue shirt zzz").tolist() == [N_SPECIAL, N_SPECIAL + 1, UNK_ID]
    hashed = Tokenizer(TokenizerConfig(vocab=("blue",), oov_buckets=10))
    a, b = hashed.encode("zzz").tolist(), hashed.encode("zzz").tolist()
    assert a == b and N_SPECIAL + 1 <= a[0] < N_SPECIAL + 11


def test_encode_truncates_and_pad_fills():
    t = Tokenizer(TokenizerConfig(max_tokens=3, vocab=("a",)))
    ids = t.encode("a a a a a")
    assert len(ids) == 3 and ids.dtype == np.int32
    padded = t.pad([ids, np.zeros(0, np.int32)])
    assert padded.shape == (2, 3) and padded.dtype == np.int64 and (padded[1] == PAD_ID).all()


def test_fingerprint_follows_vocabulary():
    assert TokenizerConfig(vocab=("a",)).fingerprint == TokenizerConfig(vocab=("a",)).fingerprint
    assert TokenizerConfig(vocab=("a",)).fingerprint != TokenizerConfig(vocab=("b",)).fingerprint


def test_a_hangul_word_longer_than_any_real_one_is_tagged_cut_to_its_first_characters():
    # Okt's time grows with a word's length (1,000 characters: ~10 s of a preprocess worker for one name)
    from common.tokenize import MAX_HANGUL_WORD

    t = Tokenizer()
    blob = "가나다라마바사" * 100
    assert t.words(f"nike {blob} 운동화") == ["nike", *t.words(blob[:MAX_HANGUL_WORD]), "운동화"]
    whole = ("콜라겐원단여성브라운동화" * 4)[:MAX_HANGUL_WORD]  # no longer than the cap: tagged whole
    assert "".join(t.words(whole)) == whole


def test_encode_tags_no_more_of_a_long_name_than_its_first_max_tokens_need():
    # each Hangul run is a tagger call: a 1,000-character name of 250 runs cost 250 calls for 32 kept tokens
    t = Tokenizer(TokenizerConfig(max_tokens=8))
    tagged: list[str] = []
    morphemes = t._morphemes
    t._morphemes = lambda run: tagged.append(run) or morphemes(run)
    many_runs = "가방 a " * 250
    many_words = "나이키 운동화 " * 150
    for name in (many_runs, many_words, "남성 반팔 티셔츠 blue 100 cotton 여름 신상"):
        assert t.words(name, 8) == t.words(name)[:8]
    tagged.clear()
    t.encode(many_runs)
    assert len(tagged) <= 8
    tagged.clear()
    t.encode(many_words)
    assert [len(run.split()) for run in tagged] == [8]  # the one run, cut to the words that can be kept


def test_accented_latin_is_folded_to_its_base_letters():
    # "été" was cut at each accent into "t", which a Myntra model reads as "T-shirt" (Tshirts, confidence 1.0)
    t = Tokenizer()
    assert t.words("Robe d'été") == ["robe", "d", "ete"]
    assert t.words("Crème Brûlée") == ["creme", "brulee"]
    assert t.words("남성 티셔츠 Été") == [*t.words("남성 티셔츠"), "ete"]  # Hangul is left whole
