// The image recipes of handlers/images.py, for the browser, with the same arithmetic: Pillow's fixed-point
// resampling and alpha compositing, numpy's float32 rounding (Math.fround) and Python's round-half-even.
// tests/test_page.py checks that a canvas or a dropped PNG becomes the very tensor the servers compute.
"use strict";

const Images = (() => {
  const f32 = Math.fround;
  const DIGIT_BOX = 20 / 28;
  const WORKING_SIDE = 1024;
  const BLANK_CONTRAST = 16;
  const GREY_RECIPES = ["mnist-digit", "fashion"];
  const PRECISION_BITS = 22; // Pillow's Resample.c, 8 bits per channel

  class InputError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // ---- Pillow's resampling (libImaging/Resample.c), for 8-bit images of any channel count

  function sinc(x) {
    if (x === 0) return 1;
    x *= Math.PI;
    return Math.sin(x) / x;
  }
  const FILTERS = {
    lanczos: { support: 3, fn: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
    bilinear: { support: 1, fn: (x) => ((x = Math.abs(x)) < 1 ? 1 - x : 0) },
  };

  function coefficients(inSize, outSize, filter) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1);
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const kk = new Float64Array(outSize * ksize);
    const bounds = new Int32Array(outSize * 2);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const w = filter.fn((x + xmin - center + 0.5) * ss);
        kk[xx * ksize + x] = w;
        ww += w;
      }
      for (let x = 0; x < xmax; x++) if (ww !== 0) kk[xx * ksize + x] /= ww;
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    const fixed = new Int32Array(kk.length); // normalize_coeffs_8bpc
    for (let i = 0; i < kk.length; i++) {
      const v = kk[i] * (1 << PRECISION_BITS);
      fixed[i] = kk[i] < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
    }
    return { kk: fixed, bounds, ksize };
  }

  function clip8(v) {
    if (v >= 1 << 30) return 255;
    if (v <= 0) return 0;
    return v >> PRECISION_BITS;
  }

  function horizontal(src, sw, rows, offset, c, outW, co) {
    const out = new Uint8Array(rows * outW * c);
    for (let y = 0; y < rows; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = co.bounds[xx * 2], xmax = co.bounds[xx * 2 + 1], k = xx * co.ksize;
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) ss += src[((y + offset) * sw + x + xmin) * c + ch] * co.kk[k + x];
          out[(y * outW + xx) * c + ch] = clip8(ss);
        }
      }
    }
    return out;
  }

  function vertical(src, sw, c, outH, co) {
    const out = new Uint8Array(outH * sw * c);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = co.bounds[yy * 2], ymax = co.bounds[yy * 2 + 1], k = yy * co.ksize;
      for (let x = 0; x < sw; x++) {
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) ss += src[((y + ymin) * sw + x) * c + ch] * co.kk[k + y];
          out[(yy * sw + x) * c + ch] = clip8(ss);
        }
      }
    }
    return out;
  }

  // px: Uint8Array of h*w*c, row-major; returns a Uint8Array of outH*outW*c (ImagingResampleInner, Pillow 13)
  function resample(px, w, h, c, outW, outH, filterName) {
    if (outW === w && outH === h) return px.slice();
    const filter = FILTERS[filterName];
    const needH = outW !== w, needV = outH !== h;
    // when the height shrinks by more than twice what the width does, Pillow runs the vertical pass first
    const horizontalFirst = !(h - outH > 0 && h - outH > (w - outW) * 2);
    const vt = needV || (needH && horizontalFirst) ? coefficients(h, outH, filter) : null;
    const hz = needH ? coefficients(w, outW, filter) : null;
    let src = px, sw = w;
    if (horizontalFirst) {
      if (needH) {
        const first = vt.bounds[0], last = vt.bounds[outH * 2 - 2] + vt.bounds[outH * 2 - 1];
        for (let i = 0; i < outH; i++) vt.bounds[i * 2] -= first;
        src = horizontal(src, sw, last - first, first, c, outW, hz);
        sw = outW;
      }
      if (needV) src = vertical(src, sw, c, outH, vt);
    } else {
      if (needV) src = vertical(src, sw, c, outH, vt);
      if (needH) {
        src = horizontal(src, sw, outH, 0, c, outW, hz);
        sw = outW;
      }
    }
    return src;
  }

  // Pillow's Image.reduce(factor): box averages, rounded as libImaging/Reduce.c rounds them
  function reduce(px, w, h, c, factor) {
    const ow = Math.ceil(w / factor), oh = Math.ceil(h / factor), out = new Uint8Array(ow * oh * c);
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        const y1 = Math.min(h, (y + 1) * factor), x1 = Math.min(w, (x + 1) * factor);
        const area = (y1 - y * factor) * (x1 - x * factor);
        const multiplier = Math.trunc(f32(f32(4294967296) / f32(256 * area)));
        for (let ch = 0; ch < c; ch++) {
          let ss = Math.trunc(area / 2);
          for (let yy = y * factor; yy < y1; yy++) for (let xx = x * factor; xx < x1; xx++) ss += px[(yy * w + xx) * c + ch];
          out[(y * ow + x) * c + ch] = Math.floor((ss * multiplier) / 16777216); // (ss * multiplier) >> 24
        }
      }
    }
    return { px: out, w: ow, h: oh };
  }

  // ---- handlers/images.py

  // RGBA (ImageData) to uint8 grey or RGB; transparency composited onto white as Image.alpha_composite does
  function flatten(rgba, w, h, channels) {
    const n = w * h, out = new Uint8Array(n * channels);
    for (let i = 0; i < n; i++) {
      let r = rgba[i * 4], g = rgba[i * 4 + 1], b = rgba[i * 4 + 2];
      const a = rgba[i * 4 + 3];
      if (a !== 255) {
        if (a === 0) {
          r = g = b = 255;
        } else {
          const outa255 = a * 255 + 255 * (255 - a);
          const coef1 = Math.trunc((a * 255 * 255 * 128) / outa255), coef2 = 255 * 128 - coef1;
          const div = (t) => ((((t + (0x80 << 7)) >>> 8) + (t + (0x80 << 7))) >>> 8) >>> 7;
          r = div(r * coef1 + 255 * coef2);
          g = div(g * coef1 + 255 * coef2);
          b = div(b * coef1 + 255 * coef2);
        }
      }
      if (channels === 1) out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16; // Pillow's L24
      else out.set([r, g, b], i * 3);
    }
    return out;
  }

  function lightBackground(g, w, h) {
    let light = 0;
    const count = (i) => (light += g[i] > 127 ? 1 : 0);
    for (let x = 0; x < w; x++) { count(x); count((h - 1) * w + x); }
    for (let y = 0; y < h; y++) { count(y * w); count(y * w + w - 1); }
    return light * 2 > 2 * (w + h);
  }

  function blank(g) {
    let lo = 255, hi = 0;
    for (const v of g) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return hi - lo < BLANK_CONTRAST;
  }

  function ink(g, w, h) {
    const light = lightBackground(g, w, h), a = new Float32Array(w * h);
    for (let i = 0; i < a.length; i++) a[i] = light ? 255 - g[i] : g[i];
    const sorted = Float32Array.from(a).sort(), m = sorted.length >> 1;
    const median = sorted.length % 2 ? sorted[m] : f32((sorted[m - 1] + sorted[m]) / 2);
    let peak = 0;
    for (let i = 0; i < a.length; i++) { a[i] = Math.max(0, f32(a[i] - median)); peak = Math.max(peak, a[i]); }
    if (peak > 0) {
      const floor = f32(f32(0.2) * peak), gain = f32(255 / peak);
      for (let i = 0; i < a.length; i++) a[i] = a[i] < floor ? 0 : f32(a[i] * gain);
    }
    return a;
  }

  function mnistDigit(g, w, h, height, width) {
    const out = new Float32Array(height * width);
    if (w === width && h === height && !lightBackground(g, w, h)) {
      for (let i = 0; i < out.length; i++) out[i] = f32(g[i] / 255);
      return out;
    }
    const a = ink(g, w, h);
    let top = h, bottom = -1, left = w, right = -1;
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if (a[y * w + x] !== 0) {
      top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x);
    }
    if (bottom < 0) return out;
    const ch = bottom - top + 1, cw = right - left + 1, crop = new Uint8Array(ch * cw);
    for (let y = 0; y < ch; y++) for (let x = 0; x < cw; x++) crop[y * cw + x] = Math.trunc(a[(y + top) * w + x + left]);
    const scale = roundHalfEven(DIGIT_BOX * Math.min(height, width)) / Math.max(ch, cw);
    const nh = Math.min(height, Math.max(1, roundHalfEven(ch * scale)));
    const nw = Math.min(width, Math.max(1, roundHalfEven(cw * scale)));
    const small = resample(crop, cw, ch, 1, nw, nh, "lanczos");
    let total = 0, cy = 0, cx = 0;
    for (let y = 0; y < nh; y++) for (let x = 0; x < nw; x++) {
      const v = small[y * nw + x];
      total += v; cy += v * y; cx += v * x;
    }
    if (total === 0) return out;
    cy /= total;
    cx /= total;
    const clip = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
    const oy = clip(roundHalfEven(height / 2 - cy - 0.5), 0, height - nh);
    const ox = clip(roundHalfEven(width / 2 - cx - 0.5), 0, width - nw);
    for (let y = 0; y < nh; y++) for (let x = 0; x < nw; x++) out[(y + oy) * width + x + ox] = f32(small[y * nw + x] / 255);
    return out;
  }

  function fashion(g, w, h, height, width) {
    const light = lightBackground(g, w, h);
    let a = light ? g.map((v) => 255 - v) : g;
    if (w !== width || h !== height) a = resample(a, w, h, 1, width, height, "lanczos");
    return Float32Array.from(a, (v) => f32(v / 255));
  }

  function resizeCrop(px, w, h, c, height, width, short) {
    if ((h <= w && h !== short) || (w < h && w !== short)) {
      const [nh, nw] = h <= w ? [short, Math.trunc((short * w) / h)] : [Math.trunc((short * h) / w), short];
      px = resample(px, w, h, c, nw, nh, "bilinear");
      [w, h] = [nw, nh];
    }
    if (h < height || w < width) { // torchvision pads a crop larger than the image with zeros
      const ph = Math.max(h, height), pw = Math.max(w, width), pad = new Uint8Array(ph * pw * c);
      const t = Math.trunc((ph - h) / 2), l = Math.trunc((pw - w) / 2);
      for (let y = 0; y < h; y++) pad.set(px.subarray(y * w * c, (y + 1) * w * c), ((y + t) * pw + l) * c);
      [px, w, h] = [pad, pw, ph];
    }
    const top = roundHalfEven((h - height) / 2), left = roundHalfEven((w - width) / 2);
    const out = new Uint8Array(height * width * c);
    for (let y = 0; y < height; y++) out.set(px.subarray(((y + top) * w + left) * c, ((y + top) * w + left + width) * c), y * width * c);
    return out;
  }

  // handlers/model/images.py letterbox: fitted into H x W keeping its aspect, at the top left, the rest black
  function letterbox(px, w, h, c, height, width) {
    const scale = Math.min(height / h, width / w);
    const nh = Math.min(height, Math.max(1, roundHalfEven(h * scale))), nw = Math.min(width, Math.max(1, roundHalfEven(w * scale)));
    if (nh !== h || nw !== w) px = resample(px, w, h, c, nw, nh, "bilinear");
    const out = new Uint8Array(height * width * c);
    for (let y = 0; y < nh; y++) out.set(px.subarray(y * nw * c, (y + 1) * nw * c), y * width * c);
    return out;
  }

  function tables(card) {
    return card.mean.map((m, i) => Float32Array.from({ length: 256 }, (_, v) => f32(f32(f32(v / 255) - f32(m)) / f32(card.std[i]))));
  }

  // The card's recipe on an RGBA image: the model's (C, H, W) float32 input, or an InputError
  function prepare(card, rgba, w, h) {
    const [c, height, width] = card.input_shape;
    let px = flatten(rgba, w, h, c);
    if (GREY_RECIPES.includes(card.preprocess)) {
      if (Math.max(w, h) > WORKING_SIDE) ({ px, w, h } = reduce(px, w, h, 1, Math.ceil(Math.max(w, h) / WORKING_SIDE)));
      if (blank(px)) throw new InputError(422, `the image is blank (one uniform shade): there is nothing for ${card.name} to recognise`);
      const pixels = (card.preprocess === "mnist-digit" ? mnistDigit : fashion)(px, w, h, height, width);
      const m = f32(card.mean[0]), s = f32(card.std[0]);
      return Float32Array.from(pixels, (v) => f32(f32(v - m) / s));
    }
    const sized = card.preprocess === "resize"
      ? resample(px, w, h, c, width, height, "bilinear")
      : card.preprocess === "letterbox" ? letterbox(px, w, h, c, height, width)
      : resizeCrop(px, w, h, c, height, width, card.resize);
    const t = tables(card), out = new Float32Array(c * height * width), n = height * width;
    for (let i = 0; i < n; i++) for (let ch = 0; ch < c; ch++) out[ch * n + i] = t[ch][sized[i * c + ch]];
    return out;
  }

  return { prepare, InputError, resample, roundHalfEven };
})();
