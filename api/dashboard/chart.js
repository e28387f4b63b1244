// A small SVG line chart: one point per epoch, a few series, y ticks, a dashed line where a new
// phase starts (ERM -> finetune). Points are SVG circles, one per value, with the value as a tooltip.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560, HEIGHT = 200;
const PAD = { left: 48, right: 12, top: 28, bottom: 34 };

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// About five round tick values spanning [low, high].
function ticks(low, high) {
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  const raw = (high - low) / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const values = [];
  for (let v = Math.floor(low / step) * step; v <= high + step * 1e-6; v += step) values.push(+v.toFixed(10));
  if (values[values.length - 1] < high) values.push(values[values.length - 1] + step);
  return values;
}

/**
 * name: what the chart shows (data-chart attribute); labels: one x label per point;
 * series: [{name, values, color}] (null values are skipped); range: fixed [min, max] or undefined;
 * dividers: indexes before which a dashed line is drawn, with a caption.
 */
export function lineChart({ name, title, labels, series, range, dividers = [] }) {
  const svg = el("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", "data-chart": name, role: "img",
                          "aria-label": title });
  svg.append(el("text", { x: PAD.left, y: 16, class: "chart-title" }, title));
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  if (!labels.length || !all.length) {
    svg.append(el("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "chart-empty", "text-anchor": "middle" },
                  "no epochs yet"));
    return svg;
  }
  const yTicks = range ? ticks(range[0], range[1]) : ticks(Math.min(...all), Math.max(...all));
  const [yMin, yMax] = [yTicks[0], yTicks[yTicks.length - 1]];
  const plotW = WIDTH - PAD.left - PAD.right, plotH = HEIGHT - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (labels.length === 1 ? plotW / 2 : (i * plotW) / (labels.length - 1));
  const y = (v) => PAD.top + plotH - ((v - yMin) / (yMax - yMin)) * plotH;

  for (const t of yTicks) {
    svg.append(el("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(t), y2: y(t), class: "grid" }));
    svg.append(el("text", { x: PAD.left - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, +t.toFixed(3)));
  }
  const every = Math.ceil(labels.length / 12);  // at most about 12 x labels
  labels.forEach((label, i) => {
    if (i % every === 0 || i === labels.length - 1) {
      svg.append(el("text", { x: x(i), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, label));
    }
  });
  for (const { index, caption } of dividers) {
    if (index <= 0 || index >= labels.length) continue;
    const at = (x(index - 1) + x(index)) / 2;
    svg.append(el("line", { x1: at, x2: at, y1: PAD.top, y2: PAD.top + plotH, class: "divider" }));
    const right = index < labels.length / 2;  // the caption on the side with more room
    svg.append(el("text", { x: right ? at + 4 : at - 4, y: PAD.top + 10, "text-anchor": right ? "start" : "end",
                            class: "tick" }, caption));
  }

  let legendX = WIDTH - PAD.right;
  for (const s of [...series].reverse()) {
    const label = el("text", { x: legendX, y: 16, "text-anchor": "end", class: "legend", fill: s.color }, `● ${s.name}`);
    svg.append(label);
    legendX -= 14 + 7 * (s.name.length + 2);
  }
  for (const s of series) {
    const points = s.values.map((v, i) => [i, v]).filter(([, v]) => v !== null && v !== undefined);
    const path = points.map(([i, v], n) => `${n ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
    svg.append(el("path", { d: path, class: "line", stroke: s.color }));
    for (const [i, v] of points) {
      const dot = el("circle", { cx: x(i), cy: y(v), r: 3.5, class: "point", fill: s.color,
                                 "data-series": s.name, "data-value": v });
      dot.append(el("title", {}, `${labels[i]} ${s.name}: ${v.toFixed(4)}`));
      svg.append(dot);
    }
  }
  return svg;
}
