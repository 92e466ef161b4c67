// FLAIR's inputs as the original makes them, from transformers.js' tokenizer (for the page and the Node check).
import { Tensor } from '@huggingface/transformers';

export const CONTEXT_LENGTH = 77;

// open_clip's cleaning (ftfy, HTML unescaping, whitespace folding, lowercasing) for what captions hold: ftfy's quote
// uncurling, Latin ligatures and full-width characters, NFC; named (&amp; &lt; &gt; &quot; &apos; &nbsp;) and numeric
// entities; and ftfy's commonest repair, UTF-8 read as Windows-1252 ("Ã©tÃ©" -> "été"), on a whole text.
const QUOTES = [[/[\u02bc\u2018-\u201b]/g, "'"], [/[\u201c-\u201f]/g, '"']];
const LIGATURES = /[\u0132\u0133\u0149\u01c7-\u01cc\u01f1-\u01f3\ufb00-\ufb06]/g;
const FULL_WIDTH = /[\u3000\uff01-\uff5e]/g;
const ENTITIES = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: '\u00a0' };
const entity = (match, body) => {
    if (body[0] !== '#') return ENTITIES[body.toLowerCase()] ?? match;
    const code = body[1] === 'x' || body[1] === 'X' ? parseInt(body.slice(2), 16) : parseInt(body.slice(1), 10);
    return Number.isFinite(code) && code <= 0x10ffff ? String.fromCodePoint(code) : match;
};
const unescape = (text) => text.replace(/&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);/g, entity);

// Windows-1252's bytes 0x80-0x9f, by the character they stand for (the rest of the byte range is Latin-1's)
const CP1252 = new Map([...'€\u0081‚ƒ„…†‡ˆ‰Š‹Œ\u008dŽ\u008f\u0090‘’“”•–—˜™š›œ\u009džŸ'].map((c, i) => [c, 0x80 + i]));
const MOJIBAKE = /[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u2122]/;

function fixMojibake(text) {
    if (!MOJIBAKE.test(text)) return text;
    const bytes = [...text].map((c) => CP1252.get(c) ?? c.codePointAt(0));
    if (bytes.some((b) => b > 0xff)) return text;
    try {
        return new TextDecoder('utf-8', { fatal: true }).decode(Uint8Array.from(bytes));
    } catch {
        return text; // not UTF-8 read as Windows-1252: leave it
    }
}

export function cleanCaption(text) {
    let clean = QUOTES.reduce((t, [pattern, plain]) => t.replace(pattern, plain), fixMojibake(text));
    clean = clean.replace(LIGATURES, (c) => c.normalize('NFKC')).replace(FULL_WIDTH, (c) => c.normalize('NFKC'));
    clean = unescape(unescape(clean.normalize('NFC')));
    return clean.split(/\s+/).filter(Boolean).join(' ').toLowerCase();
}

// Token ids `(T, 77)` int64: each text cleaned (`cleanCaption`), transformers.js' tokenizer, then open_clip's rule for a text longer than the context
// (cut to its first 76 tokens and <end_of_text>; transformers.js would drop <end_of_text>), padded with the pad id.
export function tokenize(tokenizer, texts, contextLength = CONTEXT_LENGTH) {
    const empty = tokenizer.encode('');
    const endOfText = empty[empty.length - 1];
    const data = new BigInt64Array(texts.length * contextLength).fill(BigInt(tokenizer.pad_token_id ?? 0));
    texts.forEach((text, row) => {
        let ids = tokenizer.encode(cleanCaption(text));
        if (ids.length > contextLength) ids = [...ids.slice(0, contextLength - 1), endOfText];
        ids.forEach((id, column) => { data[row * contextLength + column] = BigInt(id); });
    });
    return new Tensor('int64', data, [texts.length, contextLength]);
}

// Pixels `(B, 3, H, W)` float32 as `FlairImageProcessor` makes them: the shortest side resized as torchvision's
// Resize (long side truncated) with Pillow's bicubic resampling, in the image's own channels; the centre crop
// (zero padding when smaller; the offset rounded half to even, as Python rounds); RGB; rescaled and normalised.
// `images`: transformers.js `RawImage`s (1, 3 or 4 channels; alpha is dropped after the resize);
// `settings`: the export's preprocessor_config.json.
export function pixelValues(images, settings) {
    if (settings.do_resize !== false && (settings.resample ?? 3) !== 3) {
        throw new Error(`resample ${settings.resample}: only bicubic (3), FLAIR's, is implemented`);
    }
    const { height, width } = settings.crop_size;
    const out = new Float32Array(images.length * 3 * height * width);
    images.forEach((image, index) => {
        let plane = { data: image.data, width: image.width, height: image.height, channels: image.channels };
        if (settings.do_resize !== false) plane = resizeShortestEdge(plane, settings.size.shortest_edge);
        if (settings.do_center_crop !== false) plane = centerCrop(plane, height, width);
        normalise(plane, settings, out.subarray(index * 3 * height * width, (index + 1) * 3 * height * width));
    });
    return new Tensor('float32', out, [images.length, 3, height, width]);
}

function resizeShortestEdge(plane, shortest) {
    const portrait = plane.width <= plane.height;
    const [short, long] = portrait ? [plane.width, plane.height] : [plane.height, plane.width];
    const newLong = Math.trunc((shortest * long) / short);
    const [width, height] = portrait ? [shortest, newLong] : [newLong, shortest];
    if (width === plane.width && height === plane.height) return plane;
    return resampleBicubic(plane, width, height);
}

// Pillow's two-pass resampling (Resample.c): horizontal pass then vertical, each output pixel a sum over the input
// with fixed-point coefficients (22 fractional bits), rounded and clipped to 8 bits after each pass.
const PRECISION_BITS = 22;

function bicubic(x) {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
}

function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    const support = 2 * filterScale;
    const bounds = [];
    for (let xx = 0; xx < outSize; xx++) {
        const center = (xx + 0.5) * scale;
        const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
        const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
        const weights = [];
        for (let x = 0; x < xmax; x++) weights.push(bicubic((x + xmin - center + 0.5) / filterScale));
        const total = weights.reduce((sum, w) => sum + w, 0);
        const fixed = weights.map((w) => {
            const normalised = total !== 0 ? w / total : w;
            return Math.trunc(normalised * (1 << PRECISION_BITS) + (normalised < 0 ? -0.5 : 0.5));
        });
        bounds.push({ xmin, fixed });
    }
    return bounds;
}

function clip8(value) {
    if (value >= 2 ** (PRECISION_BITS + 8)) return 255;
    if (value <= 0) return 0;
    return Math.floor(value / 2 ** PRECISION_BITS);
}

function resampleBicubic(plane, width, height) {
    const { channels } = plane;
    const horizontal = coefficients(plane.width, width);
    const vertical = coefficients(plane.height, height);
    let source = plane;
    if (width !== plane.width) {
        const data = new Uint8ClampedArray(width * plane.height * channels);
        for (let y = 0; y < plane.height; y++) {
            for (let xx = 0; xx < width; xx++) {
                const { xmin, fixed } = horizontal[xx];
                for (let c = 0; c < channels; c++) {
                    let sum = 2 ** (PRECISION_BITS - 1);
                    for (let x = 0; x < fixed.length; x++) sum += plane.data[(y * plane.width + xmin + x) * channels + c] * fixed[x];
                    data[(y * width + xx) * channels + c] = clip8(sum);
                }
            }
        }
        source = { data, width, height: plane.height, channels };
    }
    if (height === plane.height) return source;
    const data = new Uint8ClampedArray(width * height * channels);
    for (let yy = 0; yy < height; yy++) {
        const { xmin: ymin, fixed } = vertical[yy];
        for (let x = 0; x < width; x++) {
            for (let c = 0; c < channels; c++) {
                let sum = 2 ** (PRECISION_BITS - 1);
                for (let y = 0; y < fixed.length; y++) sum += source.data[((ymin + y) * width + x) * channels + c] * fixed[y];
                data[(yy * width + x) * channels + c] = clip8(sum);
            }
        }
    }
    return { data, width, height, channels };
}

const roundHalfEven = (x) => {
    const floor = Math.floor(x);
    const diff = x - floor;
    return diff > 0.5 || (diff === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
};

function centerCrop(plane, cropHeight, cropWidth) {
    let { data, width, height, channels } = plane;
    if (width < cropWidth || height < cropHeight) {
        const paddedWidth = Math.max(width, cropWidth), paddedHeight = Math.max(height, cropHeight);
        const padded = new Uint8ClampedArray(paddedWidth * paddedHeight * channels);
        const left = Math.floor((paddedWidth - width) / 2), top = Math.floor((paddedHeight - height) / 2);
        for (let y = 0; y < height; y++) {
            padded.set(data.subarray(y * width * channels, (y + 1) * width * channels), ((top + y) * paddedWidth + left) * channels);
        }
        [data, width, height] = [padded, paddedWidth, paddedHeight];
    }
    const top = roundHalfEven((height - cropHeight) / 2), left = roundHalfEven((width - cropWidth) / 2);
    const cropped = new Uint8ClampedArray(cropWidth * cropHeight * channels);
    for (let y = 0; y < cropHeight; y++) {
        const start = ((top + y) * width + left) * channels;
        cropped.set(data.subarray(start, start + cropWidth * channels), y * cropWidth * channels);
    }
    return { data: cropped, width: cropWidth, height: cropHeight, channels };
}

function normalise(plane, settings, out) {
    const { data, width, height, channels } = plane;
    const scale = settings.do_rescale === false ? 1 : Math.fround(1 / settings.rescale_factor);
    const normalize = settings.do_normalize !== false;
    const pixels = width * height;
    for (let c = 0; c < 3; c++) {
        const mean = normalize ? Math.fround(settings.image_mean[c]) : 0, std = normalize ? Math.fround(settings.image_std[c]) : 1;
        const source = channels < 3 ? 0 : c; // grey replicated, as convert("RGB") does
        for (let i = 0; i < pixels; i++) {
            out[c * pixels + i] = Math.fround(Math.fround(Math.fround(data[i * channels + source]) / scale - mean) / std);
        }
    }
}
