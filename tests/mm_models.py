"""Tiny random multimodal, vision and encoder-decoder models for tests/test_multimodal*.py (no hub, no files).

Every builder returns ``(model, inputs)``: a float32 eager model built from a configuration written
here (two text layers, heads of 8 dimensions, fixed seed) and a padded batch whose image tensors are
drawn by code (``pixel_values`` of the shape the vision tower expects).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 97
IMAGE_TOKEN = 90  # the image placeholder id of the tiny VLMs (inside the vocabulary, never drawn as text)
HEAD_DIM = 8
INIT = 0.2  # far from uniform attention, as in tests/test_architectures.py


def _text(**o) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=128,
        initializer_range=INIT,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(o)
    return kw


def _vision(**o) -> dict:
    kw = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        num_channels=3,
        initializer_range=INIT,
    )
    kw.update(o)
    return kw


def _seeded(cls, config, seed):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    return cls(config).eval()


def _pixels(n: int, *shape: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen)


def vlm_ids(lengths, image_tokens: int, seed: int = 1, prefix: int = 1, image_id: int = IMAGE_TOKEN):
    """Left-padded rows: ``prefix`` text tokens, ``image_tokens`` image placeholders, then text."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, IMAGE_TOKEN - 5, (n,), generator=gen)
        row[prefix : prefix + image_tokens] = image_id
        ids[i, width - n :] = row
        mask[i, width - n :] = 1
    return ids, mask


@dataclass(frozen=True)
class MM:
    name: str
    build: Callable[[], tuple[torch.nn.Module, dict]]
    kind: str  # "vlm" (generative, images), "vision" (encoder of images), "seq2seq" (encoder-decoder)
    image_token: int | None = None
    float64: bool = True


def build_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision()),
        text_config=dict(model_type="llama", **_text()),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    model = _seeded(LlavaForConditionalGeneration, cfg, 21)
    ids, mask = vlm_ids((24, 20, 18), 16)
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 3, 16, 16))


VISION_START, VISION_END = 88, 89


def _qwen_vl(cls_config, cls_model, seed, vision_extra):
    text = _text(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
    text.pop("head_dim")
    cfg = cls_config(
        text_config=text,
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            in_channels=3,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=INIT,
            **vision_extra,
        ),
        image_token_id=IMAGE_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = _seeded(cls_model, cfg, seed)
    # A 16 x 16 picture: a 4 x 4 grid of patches, merged 2 x 2 into 4 image tokens per image.
    lengths = (20, 15, 12)
    ids, mask = vlm_ids(lengths, 4, prefix=2)
    for i, n in enumerate(lengths):
        start = ids.shape[1] - n
        ids[i, start + 1] = VISION_START
        ids[i, start + 6] = VISION_END
    grid = torch.tensor([[1, 4, 4]] * len(lengths))
    pixels = _pixels(16 * len(lengths), 3 * 2 * 4 * 4)
    kinds = (ids == IMAGE_TOKEN).int()  # 1 = image token: the multimodal rotary positions read it
    return model, dict(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=kinds
    )


def build_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return _qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration, 22, dict(mlp_ratio=2))


def build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    extra = dict(intermediate_size=32, out_hidden_size=32, window_size=8, fullatt_block_indexes=[1])
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, 23, extra)


def build_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = _text(
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", **_vision()),
        mm_tokens_per_image=4,
        boi_token_index=VISION_START,
        eoi_token_index=VISION_END,
        image_token_index=IMAGE_TOKEN,
        initializer_range=INIT,
    )
    model = _seeded(Gemma3ForConditionalGeneration, cfg, 24)
    lengths = (18, 14, 11)
    ids, mask = vlm_ids(lengths, 4, prefix=2)
    for i, n in enumerate(lengths):
        start = ids.shape[1] - n
        ids[i, start + 1] = VISION_START
        ids[i, start + 6] = VISION_END
    types = (ids == IMAGE_TOKEN).long()  # image tokens attend to each other both ways
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 3, 16, 16), token_type_ids=types)


def build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(
        vision_config=_vision(),
        text_config=dict(model_type="llama", **_text()),
        image_token_id=IMAGE_TOKEN,
        scale_factor=2,
    )
    model = _seeded(Idefics3ForConditionalGeneration, cfg, 25)
    ids, mask = vlm_ids((16, 12, 9), 4)  # 4 x 4 patches, pixel-shuffled 2 x 2: 4 image tokens
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 1, 3, 16, 16))


def build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = _text(model_type="gemma")
    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", **_vision(projection_dim=32)),
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vocab_size=VOCAB,
        projection_dim=32,
        hidden_size=32,
    )
    model = _seeded(PaliGemmaForConditionalGeneration, cfg, 26)
    # PaliGemma's layout: image tokens, then the prompt (token_type_ids 0: the prefix, seen both ways),
    # then the suffix (token_type_ids 1: causal).
    lengths = (26, 23, 20)
    ids, mask = vlm_ids(lengths, 16, prefix=0)
    types = torch.zeros_like(ids)
    for i in range(len(lengths)):
        types[i, -3:] = 1
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 3, 16, 16), token_type_ids=types)


def build_mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        num_channels=3,
        image_size=16,
        patch_size=4,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        vision_output_dim=32,
        supported_aspect_ratios=[[1, 1], [1, 2]],
        initializer_range=INIT,
    )
    text = _text(num_hidden_layers=3, cross_attention_layers=[1])
    text.pop("head_dim")
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    model = _seeded(MllamaForConditionalGeneration, cfg, 27)
    lengths = (14, 11, 8)
    ids, mask = vlm_ids(lengths, 1)  # one <|image|> token; the image enters through cross-attention
    batch = len(lengths)
    pixels = _pixels(batch, 1, 2, 3, 16, 16)
    aspect_ids = torch.tensor([[2], [1], [2]])  # [1, 2] (two tiles), [1, 1] (one tile), [1, 2]
    aspect_mask = torch.tensor([[[1, 1]], [[1, 0]], [[1, 1]]])
    cross = torch.zeros(batch, ids.shape[1], 1, 2, dtype=torch.long)
    for i, n in enumerate(lengths):  # text from the image token on sees the image's real tiles
        start = ids.shape[1] - n + 1
        cross[i, start:, 0] = aspect_mask[i, 0]
    return model, dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        aspect_ratio_ids=aspect_ids,
        aspect_ratio_mask=aspect_mask,
        cross_attention_mask=cross,
    )


def build_vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(**_vision(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    model = _seeded(ViTModel, cfg, 28)
    return model, dict(pixel_values=_pixels(3, 3, 16, 16))


def build_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**_vision(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    model = _seeded(CLIPVisionModel, cfg, 29)
    return model, dict(pixel_values=_pixels(3, 3, 16, 16))


def build_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**_vision(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    model = _seeded(SiglipVisionModel, cfg, 30)
    return model, dict(pixel_values=_pixels(3, 3, 16, 16))


def _seq2seq_ids(enc_lengths, dec_lengths, seed=2):
    """Right-padded encoder inputs and decoder inputs (decoder start token 0 first, right padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, lengths in (("", enc_lengths), ("decoder_", dec_lengths)):
        width = max(lengths)
        ids = torch.randint(3, VOCAB, (len(lengths), width), generator=gen)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = ids.masked_fill(mask == 0, 1)
        if key:
            ids[:, 0] = 0
        out[key + "input_ids"] = ids
        out[key + "attention_mask"] = mask
    return out


def build_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        initializer_factor=1.0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    model = _seeded(T5ForConditionalGeneration, cfg, 31)
    return model, _seq2seq_ids((16, 11, 7), (9, 6, 4))


def build_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        init_std=INIT,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    model = _seeded(BartForConditionalGeneration, cfg, 32)
    return model, _seq2seq_ids((16, 11, 7), (9, 6, 4))


def build_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        init_std=INIT,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = _seeded(WhisperForConditionalGeneration, cfg, 33)
    ids = _seq2seq_ids((1,), (9, 6, 4))
    # 32 mel frames (two convolutions, the second of stride 2: 16 encoder positions); no padding mask.
    return model, dict(
        input_features=_pixels(3, 8, 32),
        decoder_input_ids=ids["decoder_input_ids"],
        decoder_attention_mask=ids["decoder_attention_mask"],
    )


def build_got_ocr2():
    """GOT-OCR2: a Qwen2 language model (AttentionInterface) behind a SAM vision encoder that is not."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration

    vision = dict(
        hidden_size=16,
        output_channels=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        window_size=2,
        global_attn_indexes=[0],
        mlp_dim=32,
    )
    text = _text(model_type="qwen2")
    text.pop("head_dim")
    cfg = GotOcr2Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=1)
    return _seeded(GotOcr2ForConditionalGeneration, cfg, 34), {}


#: Every architecture of docs/multimodal.md's table, with what its outputs hold.
MODELS = [
    MM("llava", build_llava, "vlm", IMAGE_TOKEN),
    MM("qwen2_vl", build_qwen2_vl, "vlm", IMAGE_TOKEN),
    MM("qwen2_5_vl", build_qwen2_5_vl, "vlm", IMAGE_TOKEN),
    MM("gemma3", build_gemma3, "vlm", IMAGE_TOKEN),
    MM("idefics3", build_idefics3, "vlm", IMAGE_TOKEN),
    MM("paligemma", build_paligemma, "vlm", IMAGE_TOKEN),
    MM("mllama", build_mllama, "vlm", IMAGE_TOKEN),
    MM("vit", build_vit, "vision"),
    MM("clip", build_clip, "vision"),
    MM("siglip", build_siglip, "vision"),
    MM("t5", build_t5, "seq2seq"),
    MM("bart", build_bart, "seq2seq"),
    MM("whisper", build_whisper, "seq2seq"),
]
BY_NAME = {m.name: m for m in MODELS}


# -- processors and saved folders, for scans that load a VLM like a real checkpoint ---------------------

#: The words of the tiny tokenizer (ids 3, 4, ...): the shapes corpus's prompts and a chat template's roles.
WORDS = (
    "question answer in a few words what colour is the square circle triangle how many squares circles "
    "triangles are there where red green blue yellow top bottom left right zero one two three four user "
    "assistant : ? . , <image> <fake_token_around_image> <global-img>"
).split()
#: A chat template of the kind VLM processors ship: a user turn of images then text, then the answer prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %} .{% endfor %}{% if add_generation_prompt %} assistant :"
    "{% endif %}"
)


def tiny_tokenizer():
    """A word-level fast tokenizer of :data:`VOCAB` ids (pad 0, BOS 1, EOS 2, unknown 3; ``<image>`` is
    :data:`IMAGE_TOKEN`), lower-casing, built in code."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        if word != "<image>":
            vocab.setdefault(word, len(vocab))
    vocab["<image>"] = IMAGE_TOKEN
    assert len(vocab) <= IMAGE_TOKEN and max(vocab.values()) < VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def llava_processor(chat: bool = True):
    """A LlavaProcessor for :func:`build_llava`: 16 x 16 pictures, patches of 4, 16 image tokens (no CLS)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True, do_convert_rgb=True
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tiny_tokenizer(),
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE if chat else None,
    )


def save_llava(folder, chat: bool = True):
    """The tiny Llava of :func:`build_llava` saved with its processor: a folder ``headmap scan`` loads."""
    model, _ = build_llava()
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.save_pretrained(folder)
    llava_processor(chat).save_pretrained(folder)
    return folder


def idefics3_processor():
    """An Idefics3Processor (SmolVLM's) for :func:`build_idefics3`: one 16 x 16 tile, 4 image tokens per image
    (4 x 4 patches, pixel-shuffled 2 x 2), no splitting, around them ``<fake_token_around_image>``."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    images = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 16}, max_image_size={"longest_edge": 16}
    )
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    return Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=CHAT_TEMPLATE)


def save_idefics3(folder):
    """The tiny Idefics3 of :func:`build_idefics3` saved with its processor."""
    model, _ = build_idefics3()
    model.config.architectures = ["Idefics3ForConditionalGeneration"]
    model.save_pretrained(folder)
    idefics3_processor().save_pretrained(folder)
    return folder


# -- encoder-decoders saved like real checkpoints, for tests/test_encdec_scan.py -----------------------

#: The words of the tiny seq2seq tokenizer: the ``tones`` transcripts, the frequencies, and a few pair words.
SEQ2SEQ_WORDS = (
    "a tone of chirp from to two tones and hertz 220 330 440 550 660 880 1100 1320 "
    "the cat sat on mat dog ran le chat est assis sur tapis chien a couru translate : . ,"
).split()


def seq2seq_tokenizer():
    """A word-level fast tokenizer for the tiny T5, BART and Whisper (``<s>`` 0, pad 1, EOS 2, unknown 3, the ids
    of their configs), lower-casing, that ends every text with EOS; built in code."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for word in SEQ2SEQ_WORDS:
        vocab.setdefault(word, len(vocab))
    assert max(vocab.values()) < VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def whisper_feature_extractor():
    """A WhisperFeatureExtractor for :func:`build_whisper`: 8 mel bins, 16 kHz, clips padded or cut to 1 s,
    hop 500 (32 frames: the 16 encoder positions of the tiny Whisper)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, hop_length=500, chunk_length=1, n_fft=1000)


def save_seq2seq(name: str, folder):
    """The tiny ``t5``, ``bart`` or ``whisper`` of this file saved with its tokenizer (and Whisper's feature
    extractor): a folder ``headmap scan`` loads like a real checkpoint."""
    model, _ = BY_NAME[name].build()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    seq2seq_tokenizer().save_pretrained(folder)
    if name == "whisper":
        whisper_feature_extractor().save_pretrained(folder)
    return folder
