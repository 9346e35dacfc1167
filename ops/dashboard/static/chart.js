// A small line chart in SVG, written for this page (no library, nothing from a CDN).
'use strict';
const SVG_NS = 'http://www.w3.org/2000/svg';

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// points: [{x: round id, y: value in [0, 1]}]; draws axes, grid, a polyline and one dot per point.
function lineChart(svg, points) {
  const w = Number(svg.getAttribute('width')), h = Number(svg.getAttribute('height'));
  const m = { left: 40, right: 12, top: 12, bottom: 28 };
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const pw = w - m.left - m.right, ph = h - m.top - m.bottom;
  const xs = points.map((p) => p.x);
  const x0 = xs.length ? Math.min(...xs) : 0, x1 = xs.length ? Math.max(...xs) : 1;
  const sx = (x) => m.left + (x1 === x0 ? pw / 2 : ((x - x0) / (x1 - x0)) * pw);
  const sy = (y) => m.top + (1 - y) * ph;
  for (const g of [0, 0.25, 0.5, 0.75, 1]) {
    svg.appendChild(svgEl('line', { x1: m.left, x2: w - m.right, y1: sy(g), y2: sy(g), class: 'grid' }));
    svg.appendChild(svgEl('text', { x: m.left - 6, y: sy(g) + 4, 'text-anchor': 'end', class: 'tick' }, g.toFixed(2)));
  }
  svg.appendChild(svgEl('line', { x1: m.left, x2: w - m.right, y1: sy(0), y2: sy(0), class: 'axis' }));
  svg.appendChild(svgEl('line', { x1: m.left, x2: m.left, y1: sy(0), y2: sy(1), class: 'axis' }));
  if (!points.length) {
    svg.appendChild(svgEl('text', { x: w / 2, y: h / 2, 'text-anchor': 'middle', class: 'empty' }, 'no round evaluated yet'));
    return;
  }
  svg.appendChild(svgEl('polyline', { points: points.map((p) => `${sx(p.x)},${sy(p.y)}`).join(' '), class: 'line' }));
  for (const p of points) {
    const dot = svgEl('circle', { cx: sx(p.x), cy: sy(p.y), r: 3.5, class: 'dot', 'data-round': p.x });
    dot.appendChild(svgEl('title', {}, `round ${p.x}: ${p.y.toFixed(3)}`));
    svg.appendChild(dot);
  }
  for (const x of [...new Set(xs)]) {
    svg.appendChild(svgEl('text', { x: sx(x), y: h - 8, 'text-anchor': 'middle', class: 'tick' }, String(x)));
  }
}
window.lineChart = lineChart;
