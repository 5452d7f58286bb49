// DiT Distillery: live training monitor on the "Train LoRA / Full" node.
//
// Why: ComfyUI shows a progress bar and nothing else while a node runs; a training run needs its loss curve,
// its latest validation grid and an ETA to be worth watching (competitors.md §1: "no live progress, no
// validation images"). The node sends two websocket events (nodes/train.py docstring):
//   dit_distillery.train       {node, prompt_id, phase, step, total, loss, lr, images_per_s, eta_s, history, message}
//   dit_distillery.validation  {node, prompt_id, step, url, image}
// This extension keeps the latest state per node id and shows it in one DOM widget under the node's inputs:
// a status line, a progress bar, a loss chart (raw points + smoothed line) and the validation image.
//
// Cheap: events arrive at most 4 per second; each only marks its node dirty, and the drawing happens once per
// animation frame, on the widget's own canvas (the graph canvas is never asked to redraw).
// Robust: events for nodes that are not on the canvas (another workflow tab, a deleted node) are kept by id
// and shown if such a node appears; after a page reload the state comes back from sessionStorage, and the
// next event (which carries the whole loss history) brings the chart up to date, or, if the run ended
// meanwhile, the server's history and the run's metrics.jsonl do.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "dit_distillery.train_monitor";
const TRAIN_NODE = "DD_TrainLoRAFull";
const TRAIN_EVENT = "dit_distillery.train";
const VALIDATION_EVENT = "dit_distillery.validation";
const WIDGET_NAME = "dd_train_monitor";
const STORE_PREFIX = "dit_distillery.monitor.";
const SMOOTHING = 0.8; // EMA weight of the smoothed line (debiased, as TensorBoard draws it)
const CHART_HEIGHT = 130;
const IMAGE_HEIGHT = 170;

const TERMINAL = new Set(["done", "stopped", "error"]);
const MAX_POINTS = 256; // as many loss points as the node sends

const states = new Map(); // node id (string) -> latest state
const monitors = new Map(); // node id (string) -> Monitor of the node on the canvas with that id
const dirty = new Set();
let frameRequested = false;

// ---------------------------------------------------------------------------------------------------------
// State

function loadState(id) {
  if (states.has(id)) return states.get(id);
  try {
    const saved = sessionStorage.getItem(STORE_PREFIX + id);
    if (saved) {
      const state = JSON.parse(saved);
      states.set(id, state);
      return state;
    }
  } catch (err) {
    // a full or disabled sessionStorage only costs the restore after a reload
  }
  return null;
}

function saveState(id, state) {
  try {
    sessionStorage.setItem(STORE_PREFIX + id, JSON.stringify(state));
  } catch (err) {
    // see loadState
  }
}

function update(id, changes) {
  const state = { ...(loadState(id) || {}), ...changes, updated: Date.now() };
  states.set(id, state);
  dirty.add(id);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(flush);
  }
}

function flush() {
  frameRequested = false;
  for (const id of dirty) {
    const state = states.get(id);
    saveState(id, state);
    const monitor = monitors.get(id);
    if (monitor && monitor.node.graph) monitor.render(state);
  }
  dirty.clear();
}

function onTrain(event) {
  const data = event.detail;
  if (!data || data.node == null) return;
  const id = String(data.node);
  const previous = loadState(id);
  const changes = { ...data };
  if (!Array.isArray(data.history) || (data.history.length === 0 && previous?.prompt_id === data.prompt_id)) {
    delete changes.history; // keep what we have rather than blanking the chart
  }
  if (previous && previous.prompt_id !== data.prompt_id && data.phase === "data") {
    changes.validation = previous.validation ? { ...previous.validation, stale: true } : null;
  }
  update(id, changes);
}

function onValidation(event) {
  const data = event.detail;
  if (!data || data.node == null || !data.url) return;
  update(String(data.node), { validation: { url: data.url, step: data.step, prompt_id: data.prompt_id } });
}

// A run that ended while this page was away (a reload, a lost connection) sent its last events to nobody: ask
// the server's history whether the prompt finished, and read the run's loss log (metrics.jsonl, served by /view
// like any output file) for the whole curve.

const reconciling = new Set();

function runSubfolder(state, node) {
  // output/dit_distillery/<output_name>: sent by the node with every event ("run"), else seen in a validation
  // image's URL, else read from the node's widget
  if (state.run?.subfolder) return state.run.subfolder;
  const query = state.validation?.url?.split("?")[1];
  const fromImage = query ? new URLSearchParams(query).get("subfolder") : null;
  if (fromImage?.endsWith("/validation")) return fromImage.slice(0, -"/validation".length);
  const name = node?.widgets?.find((w) => w.name === "output_name")?.value;
  return name ? `dit_distillery/${name}` : null;
}

function downsample(points) {
  if (points.length <= MAX_POINTS) return points;
  const stride = (points.length - 1) / (MAX_POINTS - 1);
  return Array.from({ length: MAX_POINTS }, (_, i) => points[Math.round(i * stride)]);
}

async function readMetrics(subfolder) {
  const query = new URLSearchParams({ filename: "metrics.jsonl", subfolder, type: "output" });
  const response = await api.fetchApi(`/view?${query}`, { cache: "no-store" });
  if (!response.ok) return [];
  const points = [];
  for (const line of (await response.text()).split("\n")) {
    try {
      const item = JSON.parse(line);
      if (isFinite(item.step) && isFinite(item.loss)) points.push([item.step, item.loss]);
    } catch (err) {
      // a partly written last line
    }
  }
  return downsample(points);
}

async function reconcile(id, node) {
  const state = loadState(id);
  if (!state?.prompt_id || TERMINAL.has(state.phase) || reconciling.has(id)) return;
  reconciling.add(id);
  try {
    const response = await api.fetchApi(`/history/${encodeURIComponent(state.prompt_id)}`);
    const status = (await response.json())[state.prompt_id]?.status;
    if (!status || !["success", "error"].includes(status.status_str)) return; // queued or still running
    const current = loadState(id);
    if (current.prompt_id !== state.prompt_id || TERMINAL.has(current.phase)) return; // an event was quicker
    const ok = status.status_str === "success";
    const changes = { phase: ok ? "done" : "stopped", eta_s: null,
                      message: `${ok ? "finished" : "stopped"} while this page was away` };
    const subfolder = runSubfolder(current, node);
    const history = subfolder ? await readMetrics(subfolder) : [];
    if (history.length) {
      const [step, loss] = history[history.length - 1];
      Object.assign(changes, { history, step, loss });
    }
    update(id, changes);
  } catch (err) {
    // the server is unreachable: the next event or reconnection will tell
  } finally {
    reconciling.delete(id);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Formatting

function formatSeconds(seconds) {
  if (seconds == null || !isFinite(seconds)) return "?";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(s).padStart(2, "0")}s` : `${s}s`;
}

function formatLoss(value) {
  if (value == null || !isFinite(value)) return "?";
  return Math.abs(value) >= 0.01 ? value.toFixed(4) : value.toExponential(2);
}

function statusText(state) {
  if (!state) return "Waiting for a run: queue the workflow to see the loss and validation images here.";
  const phase = state.phase || "train";
  const step = state.step != null ? `step ${state.step}/${state.total ?? "?"}` : `0/${state.total ?? "?"} steps`;
  const parts = [`${phase}`, step];
  if (state.loss != null) parts.push(`loss ${formatLoss(state.loss)}`);
  if (state.images_per_s != null) parts.push(`${state.images_per_s.toFixed(1)} img/s`);
  if (phase === "train" && state.eta_s != null) parts.push(`ETA ${formatSeconds(state.eta_s)}`);
  return parts.join(" · ");
}

// ---------------------------------------------------------------------------------------------------------
// Drawing

function smoothed(points) {
  // Debiased exponential moving average: the curve starts at the first loss instead of at zero.
  const out = [];
  let average = 0;
  let weight = 0;
  for (const [step, loss] of points) {
    if (!isFinite(loss)) continue;
    average = SMOOTHING * average + (1 - SMOOTHING) * loss;
    weight = SMOOTHING * weight + (1 - SMOOTHING);
    out.push([step, average / weight]);
  }
  return out;
}

function quantile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.floor(q * (sorted.length - 1))))];
}

function cssColor(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

function drawChart(canvas, history) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(50, canvas.clientWidth);
  const height = Math.max(40, canvas.clientHeight);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const text = cssColor("--descrip-text", "#999");
  const grid = cssColor("--border-color", "#444");
  ctx.font = "10px sans-serif";
  ctx.fillStyle = text;
  const points = (history || []).filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]));
  if (points.length === 0) {
    ctx.textAlign = "center";
    ctx.fillText("no loss yet", width / 2, height / 2);
    return;
  }
  const line = smoothed(points);
  const losses = points.map((p) => p[1]);
  // The first steps of a run are often far above the rest: scale to the smoothed curve and most raw points.
  let top = Math.max(quantile(losses, 0.98), ...line.map((p) => p[1]));
  let bottom = Math.min(...losses);
  if (top - bottom < 1e-12) {
    top += 0.5 * Math.abs(top || 1);
    bottom -= 0.5 * Math.abs(bottom || 1);
  }
  const pad = { left: 44, right: 8, top: 6, bottom: 16 };
  const first = points[0][0];
  const last = Math.max(points[points.length - 1][0], first + 1);
  const x = (step) => pad.left + ((step - first) / (last - first)) * (width - pad.left - pad.right);
  const y = (loss) => pad.top + (1 - (Math.min(loss, top) - bottom) / (top - bottom)) * (height - pad.top - pad.bottom);

  ctx.strokeStyle = grid;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const value of [bottom, (bottom + top) / 2, top]) {
    ctx.beginPath();
    ctx.moveTo(pad.left, Math.round(y(value)) + 0.5);
    ctx.lineTo(width - pad.right, Math.round(y(value)) + 0.5);
    ctx.stroke();
    ctx.fillText(formatLoss(value), pad.left - 4, y(value));
  }
  ctx.textBaseline = "alphabetic";
  ctx.textAlign = "left";
  ctx.fillText(String(first), pad.left, height - 3);
  ctx.textAlign = "right";
  ctx.fillText(`step ${points[points.length - 1][0]}`, width - pad.right, height - 3);

  ctx.fillStyle = "rgba(110, 160, 255, 0.7)"; // raw losses: points (larger when there are few)
  const size = points.length > 120 ? 2 : 3;
  for (const [step, loss] of points) {
    ctx.fillRect(x(step) - size / 2, y(loss) - size / 2, size, size);
  }
  ctx.strokeStyle = "rgb(255, 170, 60)"; // smoothed: the line to read
  ctx.lineWidth = 2;
  ctx.beginPath();
  line.forEach(([step, loss], i) => (i ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
  ctx.stroke();
}

// ---------------------------------------------------------------------------------------------------------
// The widget

class Monitor {
  constructor(node) {
    this.node = node;
    this.id = null;
    this.imageUrl = null;
    const root = document.createElement("div");
    root.className = "dd-train-monitor";
    root.style.cssText = "display:flex;flex-direction:column;gap:4px;font:11px sans-serif;" +
      "color:var(--input-text,#ddd);box-sizing:border-box;overflow:hidden;";
    this.status = document.createElement("div");
    this.status.className = "dd-status";
    this.status.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
    const bar = document.createElement("div");
    bar.style.cssText = "height:4px;background:var(--comfy-input-bg,#222);border-radius:2px;overflow:hidden;";
    this.bar = document.createElement("div");
    this.bar.className = "dd-progress";
    this.bar.style.cssText = "height:100%;width:0;background:rgb(255,170,60);transition:width .2s;";
    bar.appendChild(this.bar);
    this.message = document.createElement("div");
    this.message.className = "dd-message";
    this.message.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;" +
      "color:var(--descrip-text,#999);min-height:13px;";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "dd-chart";
    this.canvas.style.cssText = `width:100%;height:${CHART_HEIGHT}px;flex:none;` +
      "background:var(--comfy-input-bg,#222);border-radius:4px;";
    this.caption = document.createElement("div");
    this.caption.className = "dd-validation-caption";
    this.caption.style.cssText = "color:var(--descrip-text,#999);";
    this.image = document.createElement("img");
    this.image.className = "dd-validation";
    this.image.alt = "latest validation grid";
    this.image.title = "Latest validation grid (click to open)";
    this.image.style.cssText = `width:100%;height:${IMAGE_HEIGHT}px;object-fit:contain;cursor:pointer;display:none;`;
    this.image.addEventListener("click", () => this.imageUrl && window.open(this.imageUrl, "_blank"));
    root.append(this.status, bar, this.message, this.canvas, this.caption, this.image);
    this.root = root;
    this.lastHistory = null;
    new ResizeObserver(() => this.lastHistory && drawChart(this.canvas, this.lastHistory)).observe(this.canvas);
  }

  attach(id) {
    // Called whenever the node's id may have changed (creation, configure, paste): one monitor per id.
    if (this.id !== null && monitors.get(this.id) === this) monitors.delete(this.id);
    this.id = String(id);
    if (this.node.id == null || this.node.id === -1) return;
    monitors.set(this.id, this);
    this.render(loadState(this.id));
    reconcile(this.id, this.node);
  }

  detach() {
    if (this.id !== null && monitors.get(this.id) === this) monitors.delete(this.id);
  }

  render(state) {
    this.status.textContent = statusText(state);
    this.message.textContent = state?.message || "";
    const fraction = state && state.total ? Math.min(1, (state.step || 0) / state.total) : 0;
    this.bar.style.width = `${(fraction * 100).toFixed(1)}%`;
    this.bar.style.background = state?.phase === "error" ? "rgb(230,80,80)"
      : state?.phase === "stopped" ? "rgb(160,160,160)" : "rgb(255,170,60)";
    this.lastHistory = state?.history || [];
    drawChart(this.canvas, this.lastHistory);
    const validation = state?.validation;
    if (validation?.url) {
      const url = api.apiURL(validation.url);
      if (url !== this.imageUrl) {
        this.imageUrl = url;
        this.image.src = url;
      }
      this.image.style.display = "block";
      this.caption.textContent = `validation at step ${validation.step}` + (validation.stale ? " (previous run)" : "");
    } else {
      this.imageUrl = null;
      this.image.removeAttribute("src");
      this.image.style.display = "none";
      this.caption.textContent = "no validation image yet (set validation_prompts)";
    }
  }
}

function addMonitor(node) {
  const monitor = new Monitor(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "dd_train_monitor", monitor.root, {
    serialize: false, // not an input: never in the prompt
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => CHART_HEIGHT + IMAGE_HEIGHT + 70,
  });
  widget.serialize = false; // and never in the saved workflow's widgets_values
  node.ddMonitor = monitor;
  monitor.attach(node.id);
  return widget;
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    api.addEventListener(TRAIN_EVENT, onTrain);
    api.addEventListener(VALIDATION_EVENT, onValidation);
    api.addEventListener("reconnected", () => {
      for (const [id, monitor] of monitors) reconcile(id, monitor.node);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAIN_NODE) return;
    const chain = (name, after) => {
      const original = nodeType.prototype[name];
      nodeType.prototype[name] = function (...args) {
        const result = original?.apply(this, args);
        after.call(this, ...args);
        return result;
      };
    };
    chain("onNodeCreated", function () {
      addMonitor(this);
    });
    chain("onConfigure", function () {
      this.ddMonitor?.attach(this.id); // a loaded workflow sets the saved id after creation
    });
    chain("onAdded", function () {
      this.ddMonitor?.attach(this.id);
    });
    chain("onRemoved", function () {
      this.ddMonitor?.detach();
    });
  },
});

// For tests and curious users: the latest state per node id (read-only use), and the catch-up after a gap.
export const trainMonitorStates = states;
export { reconcile };
