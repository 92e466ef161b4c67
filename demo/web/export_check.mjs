// An ONNX export of flair-hf, read by transformers.js' own CLIP classes, tokenizer and image processor, offline:
//   node demo/web/export_check.mjs EXPORT_DIR INPUTS.json
// INPUTS.json: {"texts": [...], "images": [paths], "dtype": "fp32" | "q8"}. Prints one JSON line: the token ids
// (`flair.js`' `tokenize` on transformers.js' tokenizer) and the text embeddings; the pixel values of transformers.js'
// own image processor and the image embeddings of them; the pixel values of `flair.js`' `pixelValues` (FLAIR's
// preprocessing) and the image embeddings of those.
import path from 'node:path';
import { readFileSync } from 'node:fs';
import {
    env, AutoProcessor, AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection, RawImage,
} from '@huggingface/transformers';
import { pixelValues, tokenize } from './flair.js';

const [exportDir, inputsFile] = process.argv.slice(2);
const { texts, images, dtype } = JSON.parse(readFileSync(inputsFile, 'utf8'));
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(exportDir)) + path.sep;
const name = path.basename(path.resolve(exportDir));

const tokenizer = await AutoTokenizer.from_pretrained(name);
const processor = await AutoProcessor.from_pretrained(name);
const textModel = await CLIPTextModelWithProjection.from_pretrained(name, { dtype });
const visionModel = await CLIPVisionModelWithProjection.from_pretrained(name, { dtype });

const textInputs = { input_ids: tokenize(tokenizer, texts) };
const { text_embeds } = await textModel(textInputs);
const rawImages = await Promise.all(images.map((file) => RawImage.read(file)));
const imageInputs = await processor(rawImages);
const { image_embeds } = await visionModel(imageInputs);
const settings = JSON.parse(readFileSync(path.join(exportDir, 'preprocessor_config.json'), 'utf8'));
const flairPixels = pixelValues(rawImages, settings);
const { image_embeds: flair_image_embeds } = await visionModel({ pixel_values: flairPixels });

const numbers = (tensor) => Array.from(tensor.data, Number);
console.log(JSON.stringify({
    input_ids: { dims: textInputs.input_ids.dims, data: numbers(textInputs.input_ids) },
    text_embeds: { dims: text_embeds.dims, data: numbers(text_embeds) },
    pixel_values: { dims: imageInputs.pixel_values.dims, data: numbers(imageInputs.pixel_values) },
    image_embeds: { dims: image_embeds.dims, data: numbers(image_embeds) },
    flair_pixel_values: { dims: flairPixels.dims, data: numbers(flairPixels) },
    flair_image_embeds: { dims: flair_image_embeds.dims, data: numbers(flair_image_embeds) },
}));
