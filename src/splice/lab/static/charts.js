// Small SVG charts for the lab page: no library, nothing fetched. Each function redraws an
// <svg> from numbers it is given; every drawn shape carries its number in a data- attribute.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#3b6fb6", "#e08a2e", "#4a9d5b", "#b64a4a", "#7d5bb6", "#888"];

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function clear(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
}

function text(parent, x, y, content, attrs) {
  const t = svgEl("text", Object.assign({x, y}, attrs || {}), parent);
  t.textContent = content;
  return t;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= value) return m * p;
  return 10 * p;
}

// Horizontal bars on one linear scale: [{label, value, title}]
function hbars(svg, rows, format) {
  clear(svg);
  const width = +svg.getAttribute("width"), left = 150, right = 150, h = 22, gap = 8;
  const max = Math.max(...rows.map(r => r.value), 1);
  svg.setAttribute("height", rows.length * (h + gap) + gap);
  rows.forEach((r, i) => {
    const y = gap + i * (h + gap);
    const w = Math.max((width - left - right) * r.value / max, r.value > 0 ? 1 : 0);
    text(svg, left - 8, y + h * 0.7, r.label, {"text-anchor": "end", class: "axis"});
    svgEl("rect", {x: left, y, width: w, height: h, fill: COLORS[i % COLORS.length],
                   "data-label": r.label, "data-value": r.value}, svg);
    text(svg, left + w + 6, y + h * 0.7, format(r.value), {class: "axis"});
  });
}

// Stacked vertical bars: groups [{label, parts: {name: value}}], parts in `order`
function stackedBars(svg, groups, order, format) {
  clear(svg);
  const width = +svg.getAttribute("width"), height = +svg.getAttribute("height");
  const top = 20, bottom = 40, left = 70, legend = 130;
  const plotH = height - top - bottom, plotW = width - left - legend;
  const totals = groups.map(g => order.reduce((s, k) => s + (g.parts[k] || 0), 0));
  const max = niceMax(Math.max(...totals, 0));
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4, y = top + plotH - plotH * i / 4;
    svgEl("line", {x1: left, x2: left + plotW, y1: y, y2: y, class: "grid"}, svg);
    text(svg, left - 6, y + 4, format(v), {"text-anchor": "end", class: "axis"});
  }
  const slot = plotW / Math.max(groups.length, 1), bw = Math.min(80, slot * 0.6);
  groups.forEach((g, gi) => {
    let y = top + plotH;
    const x = left + gi * slot + (slot - bw) / 2;
    order.forEach((k, ki) => {
      const v = g.parts[k] || 0, h = plotH * v / max;
      y -= h;
      const r = svgEl("rect", {x, y, width: bw, height: h, fill: COLORS[ki % COLORS.length],
                               class: "segment", "data-group": g.label, "data-part": k,
                               "data-value": v}, svg);
      svgEl("title", {}, r).textContent = `${g.label} ${k}: ${format(v)}`;
    });
    text(svg, x + bw / 2, top + plotH + 16, g.label, {"text-anchor": "middle", class: "axis"});
    text(svg, x + bw / 2, y - 5, format(totals[gi]), {"text-anchor": "middle", class: "axis total",
                                                        "data-group": g.label, "data-value": totals[gi]});
    if (g.peak !== undefined) {
      const py = top + plotH - plotH * g.peak / max;
      svgEl("line", {x1: x - 6, x2: x + bw + 6, y1: py, y2: py, class: "peak",
                     "data-group": g.label, "data-value": g.peak}, svg);
      text(svg, x + bw + 8, py + 4, "peak " + format(g.peak), {class: "axis"});
    }
  });
  order.forEach((k, ki) => {
    const y = top + ki * 20;
    svgEl("rect", {x: left + plotW + 16, y, width: 12, height: 12, fill: COLORS[ki % COLORS.length]}, svg);
    text(svg, left + plotW + 34, y + 10, k, {class: "axis"});
  });
}

// A line through points [[x, y]], x from 0 to xMax
function lineChart(svg, points, xMax, format) {
  clear(svg);
  const width = +svg.getAttribute("width"), height = +svg.getAttribute("height");
  const top = 12, bottom = 28, left = 50, right = 12;
  const plotW = width - left - right, plotH = height - top - bottom;
  // The y axis spans the data (padded), so a small fall is visible; the tick labels say where.
  const ys = points.map(p => p[1]);
  const hi = ys.length ? Math.max(...ys) : 1, lo = ys.length ? Math.min(...ys) : 0;
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.05 || 1;
  const yMax = hi + pad, yMin = Math.max(lo - pad, 0);
  const sx = x => left + plotW * x / Math.max(xMax, 1);
  const sy = y => top + plotH - plotH * (y - yMin) / ((yMax - yMin) || 1);
  for (let i = 0; i <= 4; i++) {
    const v = yMin + (yMax - yMin) * i / 4, y = sy(v);
    svgEl("line", {x1: left, x2: left + plotW, y1: y, y2: y, class: "grid"}, svg);
    text(svg, left - 6, y + 4, format(v), {"text-anchor": "end", class: "axis"});
  }
  text(svg, left + plotW, height - 8, `step ${xMax}`, {"text-anchor": "end", class: "axis"});
  text(svg, left, height - 8, "0", {class: "axis"});
  if (!points.length) return;
  svgEl("polyline", {points: points.map(p => `${sx(p[0])},${sy(p[1])}`).join(" "),
                     class: "line", "data-count": points.length}, svg);
  const last = points[points.length - 1];
  svgEl("circle", {cx: sx(last[0]), cy: sy(last[1]), r: 3, class: "dot"}, svg);
}

// Vertical bars for many small values: [{label, value}] on a fixed scale `max`
function columns(svg, rows, max, format) {
  clear(svg);
  const width = +svg.getAttribute("width"), height = +svg.getAttribute("height");
  const top = 12, bottom = 28, left = 50, right = 8;
  const plotW = width - left - right, plotH = height - top - bottom;
  max = niceMax(max);
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4, y = top + plotH - plotH * i / 4;
    svgEl("line", {x1: left, x2: left + plotW, y1: y, y2: y, class: "grid"}, svg);
    text(svg, left - 6, y + 4, format(v), {"text-anchor": "end", class: "axis"});
  }
  const slot = plotW / Math.max(rows.length, 1);
  rows.forEach((r, i) => {
    const h = plotH * r.value / max;
    const bar = svgEl("rect", {x: left + i * slot + slot * 0.1, y: top + plotH - h,
                               width: Math.max(slot * 0.8, 1), height: h,
                               fill: COLORS[i % 2], class: "column", "data-label": r.label,
                               "data-value": r.value}, svg);
    svgEl("title", {}, bar).textContent = `${r.label}: ${format(r.value)}`;
  });
  // Label every k-th bar so labels never overlap (about 34 px each).
  const every = Math.max(1, Math.ceil(34 / slot));
  rows.forEach((r, i) => {
    if (i % every) return;
    text(svg, left + i * slot + slot / 2, top + plotH + 12, r.short || r.label,
         {"text-anchor": "middle", class: "axis small"});
  });
}

window.charts = {hbars, stackedBars, lineChart, columns};
