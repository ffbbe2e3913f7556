// zaiproxy's dashboard: plain JavaScript, no build step, no framework.
//
// On load: read /api/config, back-fill the chosen range from /api/metrics,
// then follow one EventSource (/api/events) for live points. The usage
// tables and the newest requests come from the ledger's API, refreshed at
// most once per scrape interval while points arrive.
//
// Every snapshot field may be null or missing, and every /api call may
// answer an error: neither must throw, so values go through small guards
// and failures end up in #problem instead of the console.
"use strict";

(function () {
  const RANGES = { "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000 };
  const COLOURS = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"];
  // Variants side by side: same colour per metric, a different dash per variant.
  const DASHES = [undefined, [6, 4], [2, 3], [10, 3, 2, 3]];
  const MAX_BACKOFF_MS = 30000;
  const QUOTA_STALE_SECONDS = 900;
  const CHART_HEIGHT = 220;

  const state = {
    config: null,
    interval: 5, // seconds, from config.scrape_interval
    range: "1h",
    variant: "production",
    points: new Map(), // "timestamp|variant" -> snapshot
    charts: {}, // panel name -> { plot, key }
    source: null,
    attempt: 0, // reconnect attempts since the last "connected"
    missedEvents: false, // an error happened: back-fill when connected again
    reconnectTimer: null,
    countdownTimer: null,
    lastMetricsAt: 0,
    generation: 0, // bumped on range/variant change: late answers are dropped
    tablesDueAt: 0,
    tablesTimer: null,
    tablesSeq: 0,
    drawPending: false,
    problems: new Map(), // where -> message
  };

  // -- helpers ---------------------------------------------------------------

  const $ = (selector) => document.querySelector(selector);
  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
  const orZero = (v) => (isNumber(v) ? v : 0);

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  // Problems are kept per source so that one success does not hide another failure.
  function setProblem(where, message) {
    if (message) state.problems.set(where, message);
    else state.problems.delete(where);
    renderProblems();
  }

  function renderProblems() {
    const box = $("#problem");
    box.replaceChildren();
    for (const message of state.problems.values()) {
      const line = document.createElement("div");
      line.textContent = message;
      box.appendChild(line);
    }
    if (state.problems.has("session")) {
      // A 401 means the session cookie expired: /dashboard shows the login form.
      const link = document.createElement("a");
      link.href = "/dashboard";
      link.textContent = "Sign in again";
      box.appendChild(link);
    }
    box.hidden = state.problems.size === 0;
  }

  class ApiError extends Error {}
  class SessionEnded extends ApiError {}

  async function fetchJSON(url) {
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
    } catch (error) {
      throw new ApiError(`${url.split("?")[0]}: the server cannot be reached`);
    }
    if (response.status === 401) {
      setProblem("session", "The session has ended.");
      throw new SessionEnded("not signed in");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
      throw new ApiError(`${url.split("?")[0]}: ${message}`);
    }
    setProblem("session", null);
    return body;
  }

  // The message for #problem; an ended session already says so (with its link).
  const messageOf = (error) => (error instanceof SessionEnded ? null : String((error && error.message) || error));

  function number(value) {
    return isNumber(value) ? Math.round(value).toLocaleString("en-US") : "–";
  }

  function dollars(value) {
    if (!isNumber(value)) return "–";
    if (value === 0) return "$0.00";
    // A real cost too small for four decimals is not "$0.0000".
    if (Math.abs(value) < 0.0001) return "< $0.0001";
    return Math.abs(value) < 0.01 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
  }

  // Axis labels for values as small as a few tokens' cost.
  function axisDollars(_, splits) {
    return splits.map((v) => (v === 0 ? "$0" : `$${Number(v.toPrecision(2))}`));
  }

  function milliseconds(value) {
    if (!isNumber(value)) return "–";
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

  function timeOf(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "–" : date.toLocaleTimeString();
  }

  function cell(row, text, value) {
    const td = row.insertCell();
    td.textContent = text === null || text === undefined ? "–" : String(text);
    // The raw JSON number, so tests compare the page with the API exactly.
    if (value !== undefined) td.dataset.value = value === null ? "" : String(value);
    if (isNumber(value)) td.title = String(value); // e.g. a cost that rounds to $0.0000
    return td;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  // -- the charts -------------------------------------------------------------

  const field = (name) => (p) => (isNumber(p[name]) ? p[name] : null);
  // Counts are per interval: divide by the snapshot's interval for a rate.
  const perSecond = (name) => (p) =>
    isNumber(p[name]) && isNumber(p.interval_seconds) && p.interval_seconds > 0 ? p[name] / p.interval_seconds : null;

  // Each panel: its series as [label, value of a snapshot, scale]. Series on
  // the "right" scale (counts, percentages) get their own axis on the right,
  // so they do not flatten the rates they are drawn with.
  const PANELS = {
    requests: [
      ["req/s", field("req_rate")],
      ["2xx/s", perSecond("requests_2xx")],
      ["4xx/s", perSecond("requests_4xx")],
      ["5xx/s", perSecond("requests_5xx")],
    ],
    latency: [
      ["p50 ms", field("latency_p50")],
      ["p95 ms", field("latency_p95")],
      ["p99 ms", field("latency_p99")],
    ],
    tokens: [
      ["in", field("token_rate_in")],
      ["out", field("token_rate_out")],
      ["cache read", field("token_rate_cache_read")],
      ["cache write", field("token_rate_cache_write")],
    ],
    cost: [["cumulative cost", costOf]],
    concurrency: [
      ["in flight", field("concurrent_requests")],
      ["max workers", field("max_workers")],
    ],
    limiter: [
      ["rate req/s", field("rate_limit_rps")],
      ["ceiling req/s", field("rate_limit_ceiling")],
      ["rejections", field("rate_limit_rejections"), "right"],
      ["adj up", field("rate_limit_adj_increase"), "right"],
      ["adj down", field("rate_limit_adj_decrease"), "right"],
    ],
    errors: [
      ["upstream errors", field("upstream_errors")],
      ["retries", field("retry_attempts")],
      ["error %", field("error_rate_pct"), "right"],
    ],
  };
  // Panels whose line adds its values up across the visible range.
  const CUMULATIVE = new Set(["cost"]);
  const RIGHT_AXIS_LABEL = { limiter: "per interval", errors: "%" };

  function costOf(p) {
    const parts = ["input", "output", "cache_read", "cache_write"].map((d) => p[`estimated_cost_usd_${d}`]);
    return parts.some(isNumber) ? parts.reduce((total, v) => total + orZero(v), 0) : null;
  }

  const pointKey = (p) => `${p.timestamp}|${p.variant}`;

  // The points inside the range, oldest first; older ones are dropped for good.
  function visiblePoints() {
    const edge = Date.now() - RANGES[state.range] * 1000;
    const points = [];
    for (const [key, point] of state.points) {
      if (point.timestamp < edge) state.points.delete(key);
      else points.push(point);
    }
    points.sort((a, b) => a.timestamp - b.timestamp || String(a.variant).localeCompare(String(b.variant)));
    return points;
  }

  function shownVariants(points) {
    if (state.variant !== "all") return [state.variant];
    const variants = [...new Set(points.map((p) => String(p.variant)))].sort();
    return variants.length ? variants : [state.config.variant];
  }

  // One x axis for every variant: the union of their timestamps, with
  // gaps (null) where a variant has no point.
  function chartData(name, points, variants) {
    const times = [...new Set(points.map((p) => p.timestamp))].sort((a, b) => a - b);
    const at = new Map(times.map((t, i) => [t, i]));
    const data = [times.map((t) => t / 1000)];
    const series = [];
    variants.forEach((variant, v) => {
      PANELS[name].forEach(([label, value, scale], i) => {
        const column = new Array(times.length).fill(null);
        let running = 0;
        for (const p of points) {
          if (String(p.variant) !== variant) continue;
          let y = value(p);
          if (CUMULATIVE.has(name)) {
            running += orZero(y);
            y = running;
          }
          column[at.get(p.timestamp)] = y;
        }
        data.push(column);
        series.push({
          label: variants.length > 1 ? `${label} (${variant})` : label,
          colour: COLOURS[i % COLOURS.length],
          dash: DASHES[v % DASHES.length] || (i >= COLOURS.length ? [4, 2] : undefined),
          scale: scale === "right" ? "right" : "y",
        });
      });
    });
    return { data, series };
  }

  // Wide enough for the longest tick label (tiny costs have many digits).
  function axisSize(_, values) {
    const longest = Array.isArray(values) ? Math.max(0, ...values.map((v) => String(v).length)) : 0;
    return Math.max(50, longest * 7 + 18);
  }

  function chartWidth(name) {
    const box = document.querySelector(`#panel-${name} .chart`);
    return Math.max(box ? box.clientWidth : 0, 200);
  }

  function makeChart(name, series, data) {
    const box = document.querySelector(`#panel-${name} .chart`);
    const grid = { stroke: css("--grid"), width: 1 };
    const axis = { stroke: css("--muted"), grid, ticks: grid };
    const axes = [axis, name === "cost" ? { ...axis, size: axisSize, values: axisDollars } : { ...axis, size: axisSize }];
    if (series.some((s) => s.scale === "right")) {
      axes.push({ ...axis, scale: "right", side: 1, size: 50, grid: { show: false }, label: RIGHT_AXIS_LABEL[name] });
    }
    const options = {
      width: chartWidth(name),
      height: CHART_HEIGHT,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, right: { auto: true } },
      axes,
      series: [{}].concat(
        series.map((s) => ({
          label: s.label,
          scale: s.scale,
          stroke: css(s.colour),
          width: 1.5,
          dash: s.dash,
          spanGaps: false,
          points: { show: false },
        })),
      ),
    };
    box.replaceChildren();
    return new uPlot(options, data, box);
  }

  function draw() {
    state.drawPending = false;
    if (!state.config) return;
    const points = visiblePoints();
    const variants = shownVariants(points);
    for (const name of Object.keys(PANELS)) {
      const { data, series } = chartData(name, points, variants);
      const chart = state.charts[name];
      // Same series as before: just new data; otherwise build the chart again.
      const key = series.map((s) => s.label).join("|");
      if (chart && chart.key === key) {
        chart.plot.setData(data);
      } else {
        if (chart) chart.plot.destroy();
        state.charts[name] = { plot: makeChart(name, series, data), key };
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

  // Rebuild every chart, e.g. when the colour scheme changes.
  function redrawAll() {
    for (const chart of Object.values(state.charts)) chart.plot.destroy();
    state.charts = {};
    scheduleDraw();
  }

  function resizeCharts() {
    for (const [name, chart] of Object.entries(state.charts)) {
      const width = chartWidth(name);
      if (width !== chart.plot.width) chart.plot.setSize({ width, height: CHART_HEIGHT });
    }
  }

  // "label <b>value</b>" pairs, built with the DOM (no innerHTML).
  function fillTotals(box, lead, pairs) {
    box.replaceChildren(lead);
    pairs.forEach(([label, value], i) => {
      box.append(`${i ? ", " : " "}${label} `, element("b", value));
    });
  }

  function drawTotals(points) {
    const sum = (name) => points.reduce((total, p) => total + orZero(p[name]), 0);
    fillTotals($("#token-totals"), "Over the range:", [
      ["in", number(sum("tokens_input"))],
      ["out", number(sum("tokens_output"))],
      ["cache read", number(sum("tokens_cache_read"))],
      ["cache write", number(sum("tokens_cache_write"))],
    ]);
    const parts = ["input", "output", "cache_read", "cache_write"].map((d) => sum(`estimated_cost_usd_${d}`));
    fillTotals($("#cost-totals"), "Over the range:", [
      ["total", dollars(parts.reduce((a, b) => a + b, 0))],
      ["input", dollars(parts[0])],
      ["output", dollars(parts[1])],
      ["cache read", dollars(parts[2])],
      ["cache write", dollars(parts[3])],
    ]);
  }

  function quotaWindow(title, data, now) {
    const part = element("div", undefined, "window");
    if (!data || typeof data !== "object") {
      part.textContent = `${title}: no data`;
      return part;
    }
    const used = isNumber(data.usage_ratio) ? `${(data.usage_ratio * 100).toFixed(1)}%` : "–";
    const reset = isNumber(data.reset_time_unix) ? `resets in ${until(data.reset_time_unix - now)}` : "reset unknown";
    const reached = reset === "resets in due" ? "reset due" : reset;
    part.append(`${title}: `, element("b", used), ` used, ${reached}`);
    return part;
  }

  function drawQuota(points) {
    const box = $("#quota");
    box.replaceChildren();
    // The newest snapshot that says anything about the quota (null counts:
    // polling off), this instance's own variant first when showing them all.
    const newestFirst = [...points].reverse().filter((p) => p.quota !== undefined);
    const latest = newestFirst.find((p) => p.variant === state.config.variant) || newestFirst[0];
    const quota = latest ? latest.quota : null;
    if (!quota || typeof quota !== "object") {
      box.append(element("div", "quota polling off", "muted"));
      return;
    }
    const now = Date.now() / 1000;
    box.append(quotaWindow("5-hour", quota.five_hour, now), quotaWindow("Weekly", quota.weekly, now));
    const held = quota.gate_open === false;
    box.append(element("div", held ? "holding" : "not holding", held ? "held" : ""));
    const seconds = quota.sample_age_seconds;
    if (!isNumber(seconds)) {
      box.append(element("div", "no sample yet", "muted"));
    } else {
      const stale = seconds > QUOTA_STALE_SECONDS;
      box.append(element("div", `sample ${Math.round(seconds)} s old${stale ? " (stale)" : ""}`, stale ? "stale" : ""));
    }
    if (quota.enforcement === false) box.append(element("div", "enforcement off", "muted"));
  }

  // -- the tables -------------------------------------------------------------

  const USAGE_FIELDS = ["requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"];

  function emptyRow(body, columns, text) {
    const td = cell(body.insertRow(), text);
    td.colSpan = columns;
    td.className = "empty";
  }

  function fillUsage(tableId, key, rows, emptyText) {
    const body = document.querySelector(`#${tableId} tbody`);
    body.replaceChildren();
    if (!Array.isArray(rows) || rows.length === 0) {
      emptyRow(body, 8, emptyText || "No requests in this range.");
      return;
    }
    for (const r of rows) {
      const row = body.insertRow();
      const name = r[key] === null || r[key] === undefined ? "-" : String(r[key]);
      row.dataset[key] = name;
      cell(row, name);
      for (const name of USAGE_FIELDS) cell(row, number(r[name]), r[name] ?? null);
      cell(row, dollars(r.cost_usd), r.cost_usd ?? null);
    }
  }

  function fillRequests(rows, emptyText) {
    const body = $("#requests-table tbody");
    body.replaceChildren();
    if (!Array.isArray(rows) || rows.length === 0) {
      emptyRow(body, 9, emptyText || "No requests yet.");
      return;
    }
    for (const r of rows) {
      const row = body.insertRow();
      const id = String(r.request_id);
      row.dataset.requestId = id;
      cell(row, timeOf(r.started_at));
      const link = element("a", id);
      link.href = `#request-${id}`;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        showRequest(id);
      });
      cell(row, "").appendChild(link);
      cell(row, r.client);
      cell(row, r.model);
      cell(row, r.route);
      const status = cell(row, r.status, r.status ?? null);
      if (isNumber(r.status) && r.status >= 400) status.className = "status-err";
      if (r.zai_error) status.title = `Z.AI error ${r.zai_error}`;
      cell(row, `${number(r.input_tokens)} / ${number(r.output_tokens)}`);
      cell(row, dollars(r.cost_usd), r.cost_usd ?? null);
      cell(row, milliseconds(r.duration_ms), r.duration_ms ?? null);
    }
  }

  function detailValue(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  async function showRequest(id) {
    try {
      const found = await fetchJSON(`/api/requests?request_id=${encodeURIComponent(id)}`);
      const row = found && Array.isArray(found.rows) ? found.rows[0] : null;
      if (!row) throw new ApiError(`request ${id} is not in the ledger`);
      const fields = $("#detail-fields");
      fields.replaceChildren();
      $("#detail-id").textContent = id;
      for (const [name, value] of Object.entries(row)) fields.append(element("dt", name), element("dd", detailValue(value)));
      const dialog = $("#request-detail");
      if (!dialog.open) dialog.showModal();
      setProblem("detail", null);
    } catch (error) {
      setProblem("detail", messageOf(error));
    }
  }

  const shownTables = new Map(); // table -> JSON of the rows it shows

  function changed(table, answer) {
    const text = JSON.stringify(answer && answer.rows);
    if (shownTables.get(table) === text) return false;
    shownTables.set(table, text);
    return true;
  }

  async function refreshTables() {
    const seq = ++state.tablesSeq;
    if (!state.config.ledger) {
      shownTables.clear();
      const off = "The usage ledger is off (LEDGER_ENABLED).";
      fillUsage("clients-table", "client", [], off);
      fillUsage("models-table", "model", [], off);
      fillRequests([], off);
      return;
    }
    const to = Math.ceil(Date.now() / 1000);
    const span = `from=${to - RANGES[state.range]}&to=${to}&variant=${encodeURIComponent(state.variant)}`;
    try {
      const [clients, models, requests] = await Promise.all([
        fetchJSON(`/api/usage?group_by=client&${span}`),
        fetchJSON(`/api/usage?group_by=model&${span}`),
        fetchJSON(`/api/requests?limit=20&variant=${encodeURIComponent(state.variant)}`),
      ]);
      if (seq !== state.tablesSeq) return; // a newer refresh is under way
      // Rebuild a table only when its rows changed, so a link being clicked stays put.
      if (changed("clients", clients)) fillUsage("clients-table", "client", clients && clients.rows);
      if (changed("models", models)) fillUsage("models-table", "model", models && models.rows);
      if (changed("requests", requests)) fillRequests(requests && requests.rows);
      setProblem("tables", null);
    } catch (error) {
      if (seq === state.tablesSeq) setProblem("tables", messageOf(error));
    }
  }

  // At most once per scrape interval; an event that comes too early leaves a
  // trailing refresh, so a new request still shows within about one interval.
  function tablesDue() {
    const wait = state.tablesDueAt - Date.now();
    if (wait <= 0) {
      clearTimeout(state.tablesTimer);
      state.tablesTimer = null;
      state.tablesDueAt = Date.now() + state.interval * 1000;
      refreshTables();
    } else if (!state.tablesTimer) {
      state.tablesTimer = setTimeout(() => {
        state.tablesTimer = null;
        tablesDue();
      }, wait);
    }
  }

  // -- live -------------------------------------------------------------------

  function addPoint(point) {
    if (!point || typeof point !== "object" || !isNumber(point.timestamp)) return;
    if (state.variant !== "all" && point.variant !== state.variant) return;
    state.points.set(pointKey(point), point);
  }

  // The back-fill replaces what we hold up to its newest point (long ranges
  // come in 60 s or 1 h buckets, which already count the live 5 s points
  // they cover); live points newer than that, e.g. arrived while the request
  // was in flight, are kept. The Map dedupes by timestamp and variant.
  async function backfill() {
    const generation = state.generation;
    try {
      const points = await fetchJSON(`/api/metrics?range=${state.range}&variant=${encodeURIComponent(state.variant)}`);
      if (generation !== state.generation) return; // the range or variant changed meanwhile
      const fresh = Array.isArray(points) ? points.filter((p) => p && isNumber(p.timestamp)) : [];
      const newest = fresh.reduce((m, p) => Math.max(m, p.timestamp), -Infinity);
      for (const [key, point] of state.points) if (point.timestamp <= newest) state.points.delete(key);
      fresh.forEach(addPoint);
      setProblem("metrics", null);
    } catch (error) {
      if (generation === state.generation) setProblem("metrics", messageOf(error));
    }
    scheduleDraw();
  }

  function setConnection(text, kind) {
    const badge = $("#connection");
    badge.textContent = text;
    badge.className = `badge ${kind}`;
  }

  function closeStream() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    if (state.source) {
      state.source.onmessage = state.source.onerror = null;
      state.source.close();
      state.source = null;
    }
  }

  function onFrame(event) {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      return; // not ours (the server only sends JSON frames): ignore it
    }
    if (!frame || typeof frame !== "object") return;
    if (frame.type === "connected") {
      state.attempt = 0;
      setConnection("live", "live");
      setProblem("stream", null);
      if (state.missedEvents) {
        state.missedEvents = false;
        backfill();
      }
      tablesDue();
    } else if (frame.type === "metrics") {
      state.lastMetricsAt = Date.now();
      $("#stale").hidden = true;
      addPoint(frame.data);
      scheduleDraw();
      tablesDue();
    }
  }

  function connect() {
    closeStream();
    const source = new EventSource(`/api/events?variant=${encodeURIComponent(state.variant)}`);
    state.source = source;
    source.onmessage = onFrame;
    // EventSource would retry on its own, without back-off or back-fill: take over.
    source.onerror = () => {
      closeStream();
      state.missedEvents = true;
      reconnectLater();
    };
  }

  // Back off 1 s, 2 s, 4 s ... up to 30 s, showing the countdown.
  function reconnectLater() {
    if (!navigator.onLine) setConnection("offline", "bad");
    const delay = Math.min(1000 * 2 ** state.attempt, MAX_BACKOFF_MS);
    state.attempt += 1;
    const due = Date.now() + delay;
    const show = () => {
      if (!navigator.onLine) return setConnection("offline", "bad");
      setConnection(`reconnecting in ${Math.max(0, Math.ceil((due - Date.now()) / 1000))}s`, "warn");
    };
    show();
    state.countdownTimer = setInterval(show, 1000);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  // A new range or variant (or the button): forget the old points, back-fill,
  // then reopen the one stream.
  async function restart() {
    state.generation += 1;
    closeStream();
    state.attempt = 0;
    state.missedEvents = false;
    state.points.clear();
    state.tablesDueAt = 0;
    state.lastMetricsAt = Date.now(); // the stale clock starts now, not at the next "connected"
    setConnection("connecting", "");
    scheduleDraw();
    tablesDue();
    const generation = state.generation;
    await backfill();
    if (generation === state.generation) connect();
  }

  function watchStaleness() {
    setInterval(() => {
      const stale = state.lastMetricsAt > 0 && Date.now() - state.lastMetricsAt > 3 * state.interval * 1000;
      $("#stale").hidden = !stale;
    }, 1000);
  }

  // -- start ------------------------------------------------------------------

  function fillVariants(config) {
    const select = $("#variant");
    select.replaceChildren();
    const names = Array.isArray(config.variants) ? config.variants.map(String) : [];
    if (!names.includes(config.variant)) names.unshift(config.variant);
    for (const name of [...names, "all"]) {
      const option = element("option", name);
      option.value = name;
      select.appendChild(option);
    }
    select.value = config.variant;
  }

  function showConfig(config) {
    const about = [config.instance, config.variant, config.version ? `v${config.version}` : null];
    $("#instance").textContent = about.filter((x) => x !== null && x !== undefined && x !== "").join(" · ");
    $("#logout").hidden = !config.login;
    fillVariants(config);
  }

  function wireControls() {
    $("#variant").addEventListener("change", (event) => {
      state.variant = event.target.value;
      restart();
    });
    $("#range").addEventListener("change", (event) => {
      if (!(event.target.value in RANGES)) return;
      state.range = event.target.value;
      restart();
    });
    $("#reconnect").addEventListener("click", () => (state.config ? restart() : start()));
    new ResizeObserver(resizeCharts).observe($("main"));
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", redrawAll);
    window.addEventListener("offline", () => setConnection("offline", "bad"));
  }

  async function start() {
    setConnection("connecting", "");
    try {
      const config = await fetchJSON("/api/config");
      if (!config || typeof config !== "object") throw new ApiError("/api/config: not a JSON object");
      config.variant = String(config.variant ?? "production");
      state.config = config;
      setProblem("config", null);
    } catch (error) {
      setConnection("offline", "bad");
      setProblem("config", messageOf(error));
      return;
    }
    state.interval = isNumber(state.config.scrape_interval) && state.config.scrape_interval > 0 ? state.config.scrape_interval : 5;
    state.variant = state.config.variant;
    state.range = $("#range").value in RANGES ? $("#range").value : "1h";
    showConfig(state.config);
    watchStaleness();
    await restart();
    // A link to a request (#request-ID) opens it.
    const wanted = /^#request-([0-9a-fA-F]+)$/.exec(location.hash);
    if (wanted) showRequest(wanted[1]);
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireControls();
    start();
  });
})();
