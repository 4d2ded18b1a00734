"use strict";
// A detector's boxes and a segmenter's mask on the model page: the ONNX model's outputs mapped back to the dropped
// image's pixels exactly as handlers/model/vision.py maps them, and drawn over the image.

const Vision = (() => {
  const PAD = -1;

  function fitted(card, h, w) { // handlers/model/images.py fitted_size
    const [, height, width] = card.input_shape, scale = Math.min(height / h, width / w);
    return [Math.min(height, Math.max(1, Images.roundHalfEven(h * scale))), Math.min(width, Math.max(1, Images.roundHalfEven(w * scale)))];
  }

  // ONNX outputs boxes [n, 4], scores [n], labels [n] (int64) -> TorchServe's object_detector answer, best first
  function detections(card, out, h, w) {
    const [nh, nw] = fitted(card, h, w), sx = w / nw, sy = h / nh;
    const boxes = out.boxes.data, scores = out.scores.data, labels = out.labels.data;
    const n = Math.min(scores.length, card.thresholds.detections), found = [];
    const clip = (v, hi) => Math.min(Math.max(v, 0), hi);
    const r2 = (v) => Math.round(v * 100) / 100;
    for (let i = 0; i < n; i++) {
      const b = [clip(boxes[4 * i] * sx, w), clip(boxes[4 * i + 1] * sy, h), clip(boxes[4 * i + 2] * sx, w), clip(boxes[4 * i + 3] * sy, h)];
      found.push({ [card.labels[Number(labels[i])]]: b.map(r2), score: Math.round(scores[i] * 1e6) / 1e6 });
    }
    return { detections: found, size: [h, w] };
  }

  // logits [1, classes, H, W] -> each pixel's class, cut from the letterbox, brought to h x w by nearest (Pillow's)
  function segmentation(card, logits, h, w) {
    const [, height, width] = card.input_shape, classes = card.labels.length, n = height * width;
    const [nh, nw] = fitted(card, h, w), mask = new Uint8Array(h * w), counts = new Array(classes).fill(0);
    for (let y = 0; y < h; y++) {
      const sy = Math.min(nh - 1, Math.floor(((y + 0.5) * nh) / h));
      for (let x = 0; x < w; x++) {
        const sx = Math.min(nw - 1, Math.floor(((x + 0.5) * nw) / w)), p = sy * width + sx;
        let best = 0;
        for (let c = 1; c < classes; c++) if (logits[c * n + p] > logits[best * n + p]) best = c;
        mask[y * w + x] = best;
        counts[best] += 1;
      }
    }
    const named = Object.fromEntries(card.labels.map((l, i) => [l, counts[i]]).filter(([, c]) => c));
    return { counts: named, size: [h, w], mask };
  }

  function colour(i) { // class 0, the background, stays clear
    return `hsl(${(i * 137.5) % 360}, 90%, 50%)`;
  }

  // The image with the answer over it: boxes and labels, or the mask at half opacity
  function picture(card, answer, image) {
    const [h, w] = answer.size, scale = Math.min(1, 480 / Math.max(h, w));
    const canvas = document.createElement("canvas"), ctx = canvas.getContext("2d");
    canvas.width = Math.max(1, Math.round(w * scale));
    canvas.height = Math.max(1, Math.round(h * scale));
    canvas.className = "vision";
    if (image) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (answer.detections) {
      ctx.lineWidth = 2;
      ctx.font = "13px sans-serif";
      for (const d of answer.detections) {
        const label = Object.keys(d).find((k) => k !== "score"), [x1, y1, x2, y2] = d[label].map((v) => v * scale);
        const i = card.labels.indexOf(label);
        ctx.strokeStyle = ctx.fillStyle = colour(i);
        ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
        ctx.fillText(`${label} ${d.score.toFixed(2)}`, x1 + 2, Math.max(12, y1 - 3));
      }
    }
    const paint = (mask) => {
      const full = document.createElement("canvas");
      full.width = w;
      full.height = h;
      const img = full.getContext("2d").createImageData(w, h);
      const rgb = card.labels.map((_, i) => { ctx.fillStyle = colour(i); return ctx.fillStyle; });
      for (let p = 0; p < w * h; p++) {
        const c = mask[p];
        if (!c) continue;
        const hex = rgb[c];
        img.data.set([parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16), 128], p * 4);
      }
      full.getContext("2d").putImageData(img, 0, 0);
      ctx.drawImage(full, 0, 0, canvas.width, canvas.height);
    };
    if (answer.mask) paint(answer.mask);
    else if (answer.mask_png_base64) { // the server's answer: the mask as a PNG whose pixels are class indices
      const im = new Image();
      im.onload = () => {
        const c = document.createElement("canvas");
        c.width = w;
        c.height = h;
        c.getContext("2d").drawImage(im, 0, 0);
        const px = c.getContext("2d").getImageData(0, 0, w, h).data, mask = new Uint8Array(w * h);
        for (let p = 0; p < w * h; p++) mask[p] = px[p * 4];
        paint(mask);
      };
      im.src = `data:image/png;base64,${answer.mask_png_base64}`;
    }
    const legend = document.createElement("p");
    legend.className = "value";
    legend.textContent = answer.detections
      ? `${answer.detections.length} detection(s) above ${card.thresholds.score}`
      : Object.entries(answer.counts).map(([k, v]) => `${k}: ${v} px`).join(", ");
    return [canvas, legend];
  }

  return { fitted, detections, segmentation, picture, PAD };
})();
