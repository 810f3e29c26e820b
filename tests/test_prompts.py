"""Exact prompt strings, character for character, against the spec (section 2)."""

from __future__ import annotations

import pytest

from e5v.prompts import PromptConfigError, PromptSet, clean_sts_sentence, fashioniq_caption, load_prompt

LLAMA3_HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"

BODIES = {
    "text": ("A dog runs.", None, "A dog runs.\nSummary above sentence in one word: "),
    "image": (None, None, "<image>\nSummary above image in one word: "),
    "cirr_gallery": (None, None, "<image>\n Describe this image in one word:"),
    "cirr_query": ("is blue", None, '<image>Modify this image with "is blue", desribe modified image in one word:'),
    "fashioniq_gallery": (None, "dress", "<image>\n Describe this dress in one word based on its style:"),
    "fashioniq_query": (
        "is red, has sleeves",
        "toptee",
        "<image> change the style of this shirt to is red, has sleeves\n Desribe this modified shirt in one word "
        "based on its style:",
    ),
    "sts": ("A man plays", None, " A man plays.\nSummary above sentence in one word:"),
}


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_llama3_strings(kind: str) -> None:
    p = load_prompt("e5v_llama3")
    text, cat, body = BODIES[kind]
    assert p.render(kind, text, category=cat) == LLAMA3_HEAD + body + LLAMA3_TAIL


# The released strings (kongds/E5-V retrieval.py for text/image/CIRR/FashionIQ, eval_sts.py for STS), written
# out in full with the inputs of BODIES filled in. NOT "the same bodies in another wrapper": the spacing before
# [/INST] and <|end|> differs per benchmark.
MISTRAL = {
    "text": "[INST] A dog runs.\nSummary above sentence in one word: [/INST]",
    "image": "[INST] <image>\nSummary above image in one word: [/INST]",
    "cirr_gallery": "[INST] <image>\n Describe this image in one word: [/INST]",
    "cirr_query": '[INST] <image>Modify this image with "is blue", desribe modified image in one word: [/INST]',
    "fashioniq_gallery": "[INST] <image>\n Describe this dress in one word based on its style: [/INST]",
    "fashioniq_query": "[INST] <image> change the style of this shirt to is red, has sleeves\n Desribe this modified "
                       "shirt in one word based on its style: [/INST]",
    "sts": "[INST]  A man plays.\nSummary above sentence in one word: [/INST]",
}
PHI3 = {
    "text": "<|user|>\nA dog runs.\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
    "image": "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n",
    "cirr_gallery": "<|user|>\n<|image_1|>\n Describe this image in one word: <|end|>\n<|assistant|>\n",
    "cirr_query": '<|user|>\n<|image_1|>Modify this image with "is blue", desribe modified image in one word: '
                  "<|end|>\n<|assistant|>\n",
    "fashioniq_gallery": "<|user|>\n<|image_1|>\n Describe this dress in one word based on its style: "
                         "<|end|>\n<|assistant|>\n",
    "fashioniq_query": "<|user|>\n<|image_1|> change the style of this shirt to is red, has sleeves\n Desribe this "
                       "modified shirt in one word based on its style: <|end|>\n<|assistant|>\n",
    "sts": "<|user|>\n A man plays.\nSummary above sentence in one word:<|end|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_mistral_strings(kind: str) -> None:
    text, cat, _ = BODIES[kind]
    assert load_prompt("e5v_mistral").render(kind, text, category=cat) == MISTRAL[kind]


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_phi3_strings(kind: str) -> None:
    text, cat, _ = BODIES[kind]
    assert load_prompt("e5v_phi3").render(kind, text, category=cat) == PHI3[kind]


def test_faithful_training_template_wraps_only_llama3() -> None:
    # ft_llm.py: the template is put in the Llama-3 wrapper only `if 'llama-3' in base_model`, then '_' -> ' ' and strip
    for name in ("e5v_mistral", "e5v_phi3"):
        p = load_prompt(name)
        assert p.render_train("a_b c", mode="faithful") == "a_b c\nSummary above sentence in one word:"
        assert p.render_train("x", mode="fixed") == p.wrap("x\nSummary above sentence in one word:")
    assert load_prompt("e5v_llama3").render_train("x", mode="faithful").startswith("<|start header id|>user")


def test_llama3_text_prompt_literal() -> None:
    # Written out in full once, so a change to the wrapper or the body cannot slip through both sides.
    assert load_prompt("e5v_llama3").render("text", "hi") == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi\nSummary above sentence in one word: "
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("A man plays", "A man plays."),
        ("A man plays.", "A man plays."),
        ('He said "hi"', "He said 'hi'"),  # ends in a quote: no dot appended, then " -> '
        ("Is it raining?", "Is it raining."),
        ("It's 'fine'", "It's 'fine'"),
        ("", ""),
    ],
)
def test_sts_cleaning(raw: str, cleaned: str) -> None:
    assert clean_sts_sentence(raw) == cleaned


def test_fashioniq_caption_join() -> None:
    assert fashioniq_caption(["is red. ", " has long sleeves?"]) == "is red, has long sleeves"
    assert fashioniq_caption([", darker,", "shinier"]) == "darker, shinier"


def test_train_fixed_and_faithful() -> None:
    p = load_prompt("e5v_llama3")
    fixed = p.render_train("a_b c", mode="fixed")
    assert fixed == LLAMA3_HEAD + "a_b c\nSummary above sentence in one word:" + LLAMA3_TAIL
    faithful = p.render_train("a_b c", mode="faithful")
    assert faithful == (
        "<|start header id|>user<|end header id|>\n\na_b c\nSummary above sentence in one word:"
        "<|eot id|><|start header id|>assistant<|end header id|>"
    )
    assert p.train_mode == "fixed" and p.render_train("x") == p.render_train("x", mode="fixed")


def test_train_cut_to_32_tokens(embedder) -> None:
    p = load_prompt("e5v_llama3")
    tok = embedder.tokenizer
    long = " ".join(["red circle"] * 40)
    rendered = p.render_train(long, tokenizer=tok)
    sentence = rendered[len(LLAMA3_HEAD) : rendered.index("\nSummary")]
    assert len(tok(sentence, add_special_tokens=False)["input_ids"]) <= 32
    assert long.startswith(sentence.strip()) and len(sentence) < len(long)
    short = "red circle"
    assert p.render_train(short, tokenizer=tok) == p.render_train(short)


def test_missing_placeholder_fails_at_load() -> None:
    with pytest.raises(PromptConfigError, match=r"bodies\.text.*<sent>"):
        load_prompt("e5v_llama3", ["prompt.bodies.text='Summary above sentence in one word:'"])
    with pytest.raises(PromptConfigError, match=r"bodies\.image.*<image>"):
        load_prompt("e5v_llama3", ["prompt.bodies.image='no image here'"])
    with pytest.raises(PromptConfigError, match=r"wrapper.*\{body\}"):
        load_prompt("e5v_llama3", ["prompt.wrapper='[INST] [/INST]'"])
    with pytest.raises(PromptConfigError, match="train_mode"):
        load_prompt("e5v_llama3", ["prompt.train_mode=faithfull"])


def test_custom_body_needs_a_placeholder() -> None:
    with pytest.raises(PromptConfigError, match="neither"):
        PromptSet(name="x", wrapper="{body}", bodies={"mine": "hello"})
    p = PromptSet(name="x", wrapper="{body}", bodies={"mine": "<sent> in a word:"})
    assert p.render("mine", "hi") == "hi in a word:"


def test_user_text_is_inserted_verbatim() -> None:
    p = load_prompt("e5v_llama3")
    tricky = "braces {X} {body} <sent> stay"
    assert p.render("text", tricky) == LLAMA3_HEAD + tricky + "\nSummary above sentence in one word: " + LLAMA3_TAIL
