// zaiproxy's dashboard: plain JavaScript, no build step.
//
// On load: read /api/config, back-fill the chosen range from /api/metrics,
// then follow one EventSource (/api/events) for live points. The usage
// tables and the newest requests come from the ledger's API, refreshed at
// most once per interval while points arrive.
"use strict";

(function () {
  const RANGES = { "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000 };
  const COLOURS = ["--c1", "--c2", "--c3", "--c4"];
  const MAX_BACKOFF_MS = 30000;

  const state = {
    config: null,
    range: "1h",
    variant: "production",
    points: new Map(), // "timestamp-variant" -> point
    charts: {},
    source: null,
    attempt: 0,
    reconnectTimer: null,
    countdownTimer: null,
    lastEventAt: 0,
    tablesDueAt: 0,
    drawPending: false,
  };

  // -- helpers ---------------------------------------------------------------

  const $ = (selector) => document.querySelector(selector);

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  function showProblem(text) {
    const problem = $("#problem");
    problem.textContent = text || "";
    problem.hidden = !text;
  }

  async function fetchJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
    if (response.status === 401) {
      showProblem("The session has ended: reload the page to sign in again.");
      throw new Error("unauthorized");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      throw new Error(`${url.split("?")[0]}: ${message}`);
    }
    return body;
  }

  function variantQuery() {
    return state.variant === "all" ? "" : `&variant=${encodeURIComponent(state.variant)}`;
  }

  function number(value) {
    return value === null || value === undefined ? "–" : Math.round(value).toLocaleString("en-US");
  }

  function dollars(value) {
    if (value === null || value === undefined) return "–";
    if (value === 0) return "$0.00";
    if (Math.abs(value) < 0.0001) return "< $0.0001";
    return Math.abs(value) < 0.01 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
  }

  // Axis labels for values as small as a few tokens' cost.
  function axisDollars(_, splits) {
    return splits.map((v) => (v === 0 ? "$0" : `$${Number(v.toPrecision(2))}`));
  }

  function milliseconds(value) {
    if (value === null || value === undefined) return "–";
    return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
  }

  function until(seconds) {
    if (seconds <= 0) return "due";
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    if (d > 0) return `${d}d ${h}h`;
    if (h > 0) return `${h}h ${m}m`;
    return `${m}m`;
  }

  function cell(row, text, value) {
    const td = document.createElement("td");
    td.textContent = text;
    if (value !== undefined) td.dataset.value = String(value);
    row.appendChild(td);
    return td;
  }

  // -- the charts -------------------------------------------------------------

  const perInterval = (field) => (p) => (p[field] === null || p[field] === undefined ? null : p[field] / p.interval_seconds);

  // Each panel: its series, as (label, value of a point). "cumulative"
  // panels add the values up across the range.
  const PANELS = {
    requests: [
      ["all", (p) => p.req_rate],
      ["2xx", perInterval("requests_2xx")],
      ["4xx", perInterval("requests_4xx")],
      ["5xx", perInterval("requests_5xx")],
    ],
    latency: [
      ["p50", (p) => p.latency_p50],
      ["p95", (p) => p.latency_p95],
      ["p99", (p) => p.latency_p99],
    ],
    tokens: [
      ["in", (p) => p.token_rate_in],
      ["out", (p) => p.token_rate_out],
      ["cache read", (p) => p.token_rate_cache_read],
      ["cache write", (p) => p.token_rate_cache_write],
    ],
    cost: [["cost", (p) => costOf(p)]],
    concurrency: [
      ["in flight", (p) => p.concurrent_requests],
      ["max workers", (p) => p.max_workers],
    ],
    limiter: [
      ["rate", (p) => p.rate_limit_rps],
      ["ceiling", (p) => p.rate_limit_ceiling],
      ["rejections", (p) => p.rate_limit_rejections],
      ["adjustments", (p) => (p.rate_limit_adj_increase ?? 0) - (p.rate_limit_adj_decrease ?? 0)],
    ],
    errors: [
      ["upstream errors", (p) => p.upstream_errors],
      ["retries", (p) => p.retry_attempts],
      ["error %", (p) => p.error_rate_pct],
    ],
  };
  const CUMULATIVE = new Set(["cost"]);

  function costOf(p) {
    return (
      (p.estimated_cost_usd_input ?? 0) +
      (p.estimated_cost_usd_output ?? 0) +
      (p.estimated_cost_usd_cache_read ?? 0) +
      (p.estimated_cost_usd_cache_write ?? 0)
    );
  }

  function visiblePoints() {
    const edge = Date.now() - RANGES[state.range] * 1000;
    const points = [];
    for (const [key, point] of state.points) {
      if (point.timestamp < edge) state.points.delete(key);
      else points.push(point);
    }
    points.sort((a, b) => a.timestamp - b.timestamp || a.variant.localeCompare(b.variant));
    return points;
  }

  // One x axis for every variant: the union of their timestamps, with
  // gaps (null) where a variant has no point.
  function chartData(name, points, variants) {
    const times = [...new Set(points.map((p) => p.timestamp))].sort((a, b) => a - b);
    const at = new Map(times.map((t, i) => [t, i]));
    const data = [times.map((t) => t / 1000)];
    const labels = [];
    for (const variant of variants) {
      for (const [label, value] of PANELS[name]) {
        const column = new Array(times.length).fill(null);
        let running = 0;
        for (const p of points) {
          if (p.variant !== variant) continue;
          let v = value(p);
          if (CUMULATIVE.has(name)) {
            running += v ?? 0;
            v = running;
          }
          column[at.get(p.timestamp)] = v ?? null;
        }
        data.push(column);
        labels.push(variants.length > 1 ? `${label} (${variant})` : label);
      }
    }
    return { data, labels };
  }

  function makeChart(name, labels, data) {
    const element = document.querySelector(`#panel-${name} .chart`);
    const grid = { stroke: css("--grid"), width: 1 };
    const axis = { stroke: css("--muted"), grid, ticks: grid };
    const options = {
      width: Math.max(element.clientWidth, 200),
      height: 220,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      axes: [axis, name === "cost" ? { ...axis, size: 70, values: axisDollars } : { ...axis, size: 60 }],
      series: [{}].concat(
        labels.map((label, i) => ({
          label,
          stroke: css(COLOURS[i % COLOURS.length]),
          width: 1.5,
          dash: i >= COLOURS.length ? [6, 4] : undefined,
          spanGaps: false,
          points: { show: false },
        })),
      ),
    };
    element.replaceChildren();
    return new uPlot(options, data, element);
  }

  function draw() {
    state.drawPending = false;
    const points = visiblePoints();
    const variants = state.variant === "all" ? [...new Set(points.map((p) => p.variant))].sort() : [state.variant];
    if (variants.length === 0) variants.push(state.variant);
    for (const name of Object.keys(PANELS)) {
      const { data, labels } = chartData(name, points, variants);
      const chart = state.charts[name];
      const key = labels.join("|");
      if (chart && chart.key === key) {
        chart.plot.setData(data);
      } else {
        if (chart) chart.plot.destroy();
        state.charts[name] = { plot: makeChart(name, labels, data), key };
      }
    }
    drawTotals(points);
    drawQuota(points);
  }

  function scheduleDraw() {
    if (!state.drawPending) {
      state.drawPending = true;
      requestAnimationFrame(draw);
    }
  }

  function drawTotals(points) {
    const sum = (field) => points.reduce((total, p) => total + (p[field] ?? 0), 0);
    $("#token-totals").innerHTML =
      `In the range: in <b>${number(sum("tokens_input"))}</b>, out <b>${number(sum("tokens_output"))}</b>, ` +
      `cache read <b>${number(sum("tokens_cache_read"))}</b>, cache write <b>${number(sum("tokens_cache_write"))}</b>`;
    const parts = ["input", "output", "cache_read", "cache_write"].map((d) => sum(`estimated_cost_usd_${d}`));
    const total = parts.reduce((a, b) => a + b, 0);
    $("#cost-totals").innerHTML =
      `Total <b>${dollars(total)}</b>: input ${dollars(parts[0])}, output ${dollars(parts[1])}, ` +
      `cache read ${dollars(parts[2])}, cache write ${dollars(parts[3])}. From the proxy's TOKEN_PRICES.`;
  }

  function drawQuota(points) {
    const box = $("#quota");
    box.replaceChildren();
    const latest = [...points].reverse().find((p) => p.quota !== undefined);
    const quota = latest ? latest.quota : null;
    if (!quota) {
      box.textContent = "Quota polling off (QUOTA_POLL_ENABLED) or no sample yet.";
      return;
    }
    const now = Date.now() / 1000;
    for (const [name, title] of [["five_hour", "5-hour window"], ["weekly", "Weekly window"]]) {
      const window = quota[name];
      const part = document.createElement("div");
      part.className = "window";
      if (!window) {
        part.textContent = `${title}: no data`;
      } else {
        const reset = window.reset_time_unix ? `resets in ${until(window.reset_time_unix - now)}` : "reset unknown";
        part.innerHTML = `${title}: <b>${(window.usage_ratio * 100).toFixed(1)}%</b> used, ${reset}`;
      }
      box.appendChild(part);
    }
    const hold = document.createElement("div");
    hold.textContent = quota.gate_open ? "not holding" : "holding calls until the reset";
    if (!quota.gate_open) hold.className = "held";
    box.appendChild(hold);
    const age = document.createElement("div");
    const seconds = quota.sample_age_seconds;
    age.textContent = seconds === null ? "no sample" : `sample ${Math.round(seconds)} s old`;
    if (seconds !== null && seconds > 900) age.className = "stale";
    box.appendChild(age);
  }

  // -- the tables -------------------------------------------------------------

  function fillUsage(tableId, key, rows) {
    const body = document.querySelector(`#${tableId} tbody`);
    body.replaceChildren();
    if (rows.length === 0) {
      const row = body.insertRow();
      const td = cell(row, "No requests in this range.");
      td.colSpan = 8;
      td.className = "empty";
      return;
    }
    for (const r of rows) {
      const row = body.insertRow();
      row.dataset[key] = r[key];
      cell(row, r[key]);
      for (const field of ["requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"]) {
        cell(row, number(r[field]), r[field]);
      }
      cell(row, dollars(r.cost_usd), r.cost_usd);
    }
  }

  function fillRequests(rows) {
    const body = $("#requests-table tbody");
    body.replaceChildren();
    for (const r of rows) {
      const row = body.insertRow();
      row.dataset.requestId = r.request_id;
      cell(row, new Date(r.started_at).toLocaleTimeString());
      const link = document.createElement("a");
      link.href = `#request-${r.request_id}`;
      link.textContent = r.request_id;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        showRequest(r.request_id);
      });
      cell(row, "").appendChild(link);
      cell(row, r.client);
      cell(row, r.model);
      cell(row, r.route);
      const status = cell(row, String(r.status), r.status);
      if (r.status >= 400) status.className = "status-err";
      cell(row, `${number(r.input_tokens)} / ${number(r.output_tokens)}`);
      cell(row, dollars(r.cost_usd), r.cost_usd);
      cell(row, milliseconds(r.duration_ms), r.duration_ms);
    }
  }

  async function showRequest(id) {
    try {
      const found = await fetchJSON(`/api/requests?request_id=${encodeURIComponent(id)}`);
      const fields = $("#detail-fields");
      fields.replaceChildren();
      $("#detail-id").textContent = id;
      for (const [name, value] of Object.entries(found.rows[0] || {})) {
        const dt = document.createElement("dt");
        dt.textContent = name;
        const dd = document.createElement("dd");
        dd.textContent = value === null ? "–" : String(value);
        fields.append(dt, dd);
      }
      $("#request-detail").showModal();
    } catch (error) {
      showProblem(String(error.message || error));
    }
  }

  async function refreshTables() {
    if (!state.config || !state.config.ledger) {
      fillUsage("clients-table", "client", []);
      fillUsage("models-table", "model", []);
      return;
    }
    const to = Math.ceil(Date.now() / 1000);
    const span = `from=${to - RANGES[state.range]}&to=${to}${variantQuery()}`;
    try {
      const [clients, models, requests] = await Promise.all([
        fetchJSON(`/api/usage?group_by=client&${span}`),
        fetchJSON(`/api/usage?group_by=model&${span}`),
        fetchJSON(`/api/requests?limit=20${variantQuery()}`),
      ]);
      fillUsage("clients-table", "client", clients.rows);
      fillUsage("models-table", "model", models.rows);
      fillRequests(requests.rows);
    } catch (error) {
      showProblem(String(error.message || error));
    }
  }

  function tablesDue() {
    const now = Date.now();
    if (now >= state.tablesDueAt) {
      state.tablesDueAt = now + state.config.scrape_interval * 1000;
      refreshTables();
    }
  }

  // -- live -------------------------------------------------------------------

  function addPoint(point) {
    state.points.set(`${point.timestamp}-${point.variant}`, point);
  }

  async function backfill() {
    const points = await fetchJSON(`/api/metrics?range=${state.range}${variantQuery()}`);
    state.points.clear();
    points.forEach(addPoint);
    scheduleDraw();
  }

  function setConnection(text, kind) {
    const badge = $("#connection");
    badge.textContent = text;
    badge.className = `badge ${kind}`;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    if (state.source) state.source.close();
    const url = `/api/events${state.variant === "all" ? "" : `?variant=${encodeURIComponent(state.variant)}`}`;
    const source = new EventSource(url);
    state.source = source;
    source.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      state.lastEventAt = Date.now();
      if (frame.type === "connected") {
        state.attempt = 0;
        setConnection("live", "live");
        showProblem("");
        backfill().catch((error) => showProblem(String(error.message || error)));
        tablesDue();
      } else if (frame.type === "metrics") {
        addPoint(frame.data);
        scheduleDraw();
        tablesDue();
      }
    };
    source.onerror = () => {
      source.close();
      reconnectLater();
    };
  }

  // Back off 1 s, 2 s, 4 s ... up to 30 s, showing the countdown.
  function reconnectLater() {
    const delay = Math.min(1000 * 2 ** state.attempt, MAX_BACKOFF_MS);
    state.attempt += 1;
    const due = Date.now() + delay;
    const show = () => setConnection(`reconnecting in ${Math.max(0, Math.ceil((due - Date.now()) / 1000))} s`, "warn");
    show();
    clearInterval(state.countdownTimer);
    state.countdownTimer = setInterval(show, 1000);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function watchStaleness() {
    setInterval(() => {
      if (!state.config) return;
      const stale = state.lastEventAt > 0 && Date.now() - state.lastEventAt > 3 * state.config.scrape_interval * 1000;
      $("#stale").hidden = !stale;
    }, 1000);
  }

  function resizeCharts() {
    for (const name of Object.keys(state.charts)) {
      const element = document.querySelector(`#panel-${name} .chart`);
      state.charts[name].plot.setSize({ width: Math.max(element.clientWidth, 200), height: 220 });
    }
  }

  // -- start ------------------------------------------------------------------

  async function start() {
    try {
      state.config = await fetchJSON("/api/config");
    } catch (error) {
      setConnection("offline", "bad");
      showProblem(String(error.message || error));
      return;
    }
    const config = state.config;
    $("#instance").textContent = `${config.instance} · ${config.variant} · v${config.version}`;
    $("#logout").hidden = !config.login;
    const select = $("#variant");
    for (const name of [...config.variants, "all"]) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      select.appendChild(option);
    }
    state.variant = config.variant;
    select.value = config.variant;
    select.addEventListener("change", () => {
      state.variant = select.value;
      state.tablesDueAt = 0;
      connect();
    });
    $("#range").addEventListener("change", (event) => {
      state.range = event.target.value;
      state.tablesDueAt = 0;
      backfill().catch((error) => showProblem(String(error.message || error)));
      tablesDue();
    });
    $("#reconnect").addEventListener("click", () => {
      state.attempt = 0;
      connect();
    });
    new ResizeObserver(resizeCharts).observe($("main"));
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
      state.charts = {};
      document.querySelectorAll(".chart").forEach((element) => element.replaceChildren());
      scheduleDraw();
    });
    watchStaleness();
    scheduleDraw();
    connect();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
