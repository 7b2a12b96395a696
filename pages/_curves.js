// The Allocation page's per-block curves: an SVG drawn in place when a slider moves. Plotly re-creates its whole
// chart on every change (about 100 ms of a redraw's 300 here, and a one-trace Plotly chart alone took 195 ms from key
// press to frame); this draws the same two panels in a few milliseconds (bench/ui_latency, docs/results.md).
//
// data (pruner.charts.allocation_curves_data): {title, kept_title, blocks, band: [lo, hi] | null,
//   series: [{key, name, color, sparsity: [% per block], kept: [% of all kept weights per block]}]}

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { left: 58, right: 16, top: 26, bottom: 40 };
const TOP_HEIGHT = 300;     // px, the sparsity panel
const BOTTOM_HEIGHT = 150;  // px, the kept-weights panel
const PANEL_GAP = 48;       // px between the panels (the lower one's title sits in it)
const TICKS = 6;            // about this many ticks on a y axis
const GRID = "rgba(128, 128, 128, 0.25)";

function niceTicks(lo, hi, count) {
  // round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]
  const raw = (hi - lo) / count || 1;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
  return ticks;
}

function extent(arrays) {
  let lo = Infinity, hi = -Infinity;
  for (const a of arrays) for (const v of a) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (!isFinite(lo)) return [0, 1];
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function panel(svg, { id, top, height, width, blocks, values, title, yTitle, band, lines, markers, xTitle }) {
  // one panel: grid, y ticks, the band, one line per series; returns its scales for the hover read-out
  const ticks = niceTicks(...extent(band ? [...values, band] : values), TICKS);
  const [y0, y1] = [ticks[0], ticks[ticks.length - 1]];
  const x = (b) => MARGIN.left + (blocks > 1 ? (b / (blocks - 1)) * (width - MARGIN.left - MARGIN.right) : 0);
  const y = (v) => top + height - ((v - y0) / (y1 - y0 || 1)) * height;
  const g = el("g", {});
  g.appendChild(el("text", { x: MARGIN.left, y: top - 9, "font-size": 14, "font-weight": 600, fill: "currentColor" }, title));
  for (const t of ticks) {
    g.appendChild(el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(t), y2: y(t), stroke: GRID }));
    g.appendChild(el("text", { x: MARGIN.left - 6, y: y(t) + 4, "font-size": 11, "text-anchor": "end", fill: "currentColor" },
      String(+t.toFixed(6))));
  }
  const xStep = blocks > 40 ? 10 : 5;
  for (let b = 0; b < blocks; b += xStep) {
    g.appendChild(el("line", { x1: x(b), x2: x(b), y1: top, y2: top + height, stroke: GRID }));
    g.appendChild(el("text", { x: x(b), y: top + height + 15, "font-size": 11, "text-anchor": "middle", fill: "currentColor" }, b));
  }
  const mid = top + height / 2;
  g.appendChild(el("text", { x: 14, y: mid, "font-size": 12, "text-anchor": "middle", fill: "currentColor",
    transform: `rotate(-90 14 ${mid})` }, yTitle));
  if (xTitle) g.appendChild(el("text", { x: (MARGIN.left + width - MARGIN.right) / 2, y: top + height + 32, "font-size": 12,
    "text-anchor": "middle", fill: "currentColor" }, xTitle));
  if (band) {
    const pts = [];
    for (let b = 0; b < blocks; b++) pts.push(`${x(b)},${y(band[1])}`);
    for (let b = blocks - 1; b >= 0; b--) pts.push(`${x(b)},${y(band[0])}`);
    g.appendChild(el("polygon", { points: pts.join(" "), fill: "rgba(99, 110, 250, 0.10)", "data-name": "S ± λ" }));
  }
  for (const line of lines) {
    const pts = line.values.map((v, b) => `${x(b)},${y(v)}`).join(" ");
    g.appendChild(el("polyline", { points: pts, fill: "none", stroke: line.color,
      "stroke-width": line.width || (markers ? 2 : 1.5), "stroke-dasharray": line.dash || "none",
      "data-panel": id, "data-name": line.name, "data-y": JSON.stringify(line.values) }));
    if (markers) {
      const d = line.values.map((v, b) => `M${x(b) - 2.5},${y(v)}a2.5,2.5 0 1,0 5,0a2.5,2.5 0 1,0 -5,0`).join("");
      g.appendChild(el("path", { d, fill: line.color }));
    }
  }
  svg.appendChild(g);
  return { x, top, height };
}

function draw(root) {
  const { data, hidden } = root.__curves;
  const width = Math.max(root.clientWidth, 320);
  const shown = data.series.filter((s) => !hidden.has(s.key));
  const svg = root.querySelector("svg");
  const height = MARGIN.top + TOP_HEIGHT + PANEL_GAP + BOTTOM_HEIGHT + MARGIN.bottom;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.replaceChildren();
  const upper = panel(svg, { id: "sparsity", top: MARGIN.top, height: TOP_HEIGHT, width, blocks: data.blocks, title: data.title,
    yTitle: "sparsity (%)", band: data.band, markers: true, values: shown.map((s) => s.sparsity),
    lines: shown.map((s) => ({ name: s.name, color: s.color, dash: s.dash, width: s.width, values: s.sparsity })) });
  panel(svg, { id: "kept", top: MARGIN.top + TOP_HEIGHT + PANEL_GAP, height: BOTTOM_HEIGHT, width, blocks: data.blocks,
    title: data.kept_title, yTitle: "kept weights (%)", xTitle: "transformer block", band: null, markers: false,
    values: shown.map((s) => s.kept),
    lines: shown.map((s) => ({ name: s.name, color: s.color, dash: s.dash, width: s.width, values: s.kept })) });
  svg.appendChild(el("line", { class: "cursor", y1: MARGIN.top, y2: height - MARGIN.bottom, stroke: "currentColor",
    "stroke-opacity": 0.35, visibility: "hidden" }));
  root.__curves.x = upper.x;
  root.__curves.shown = shown;
  const legend = root.querySelector(".legend");
  const items = [];
  if (data.band) {
    const band = document.createElement("div");
    band.className = "band";
    band.innerHTML = '<span style="background:rgba(99, 110, 250, 0.25);height:10px"></span>S ± λ';
    items.push(band);
  }
  legend.replaceChildren(...items, ...data.series.map((s) => {
    const item = document.createElement("button");
    item.type = "button";
    item.title = hidden.has(s.key) ? "show" : "hide";
    item.style.cssText = `opacity:${hidden.has(s.key) ? 0.4 : 1}`;
    item.innerHTML = `<span style="background:${s.color}"></span>`;
    item.append(s.name);
    item.onclick = () => { hidden.has(s.key) ? hidden.delete(s.key) : hidden.add(s.key); draw(root); };
    return item;
  }));
}

function hover(root, event) {
  // the values of every shown curve at the block under the pointer
  const state = root.__curves;
  const svg = root.querySelector("svg");
  const tip = root.querySelector(".tip");
  const cursor = svg.querySelector(".cursor");
  const box = svg.getBoundingClientRect();
  const px = event.clientX - box.left;
  const n = state.data.blocks;
  const b = Math.round(((px - MARGIN.left) / (state.x(n - 1) - MARGIN.left || 1)) * (n - 1));
  if (b < 0 || b >= n || !state.shown.length) { tip.style.display = "none"; cursor.setAttribute("visibility", "hidden"); return; }
  cursor.setAttribute("x1", state.x(b));
  cursor.setAttribute("x2", state.x(b));
  cursor.setAttribute("visibility", "visible");
  const rows = [...state.shown].sort((p, q) => q.sparsity[b] - p.sparsity[b]).map((s) =>
    `<div><span style="background:${s.color}"></span>${s.name}: ${s.sparsity[b].toFixed(2)}% sparse, ` +
    `${s.kept[b].toFixed(2)}% of kept weights</div>`);
  tip.innerHTML = `<b>block ${b}</b>` + rows.join("");
  tip.style.display = "block";
  const left = state.x(b) + 12;
  tip.style.left = (left + tip.offsetWidth > box.width ? state.x(b) - tip.offsetWidth - 12 : left) + "px";
  tip.style.top = MARGIN.top + "px";
}

export default function (component) {
  const { data, parentElement } = component;
  let root = parentElement.querySelector(".allocation-curves");
  if (!root) {
    root = document.createElement("div");
    root.className = "allocation-curves";
    root.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" role="img"></svg><div class="legend"></div><div class="tip"></div>';
    parentElement.appendChild(root);
    root.__curves = { data, hidden: new Set() };
    const svg = root.querySelector("svg");
    svg.addEventListener("mousemove", (e) => hover(root, e));
    svg.addEventListener("mouseleave", () => {
      root.querySelector(".tip").style.display = "none";
      svg.querySelector(".cursor")?.setAttribute("visibility", "hidden");
    });
    new ResizeObserver(() => { if (root.clientWidth !== root.__curves.width) { root.__curves.width = root.clientWidth; draw(root); } }).observe(root);
  }
  root.__curves.data = data;
  root.querySelector("svg").setAttribute("aria-label", data.title);
  draw(root);
}
