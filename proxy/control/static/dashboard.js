// Turnout dashboard (docs/dashboard.md). Plain browser JavaScript: no framework, no build step,
// nothing loaded from elsewhere. Every 2 s it reads GET /admin/routes (splits, rollouts) and
// GET /admin/stats (cumulative counters) and computes rates from the counters it has seen over
// the last WINDOW_S seconds. Buttons call the admin API. Data from the server only ever goes
// into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const WINDOW_S = 10;
  const TOKEN_KEY = "turnout-admin-token";
  const HISTORY_SHOWN = 10;
  const COLORS = 6;
  // Calls each rollout state allows (docs/rollout.md); the server stays the judge (409).
  const ROLLOUT_ACTIONS = ["start", "pause", "resume", "promote", "abort"];
  const ALLOWED = {
    idle: ["start"],
    running: ["pause", "promote", "abort"],
    paused: ["resume", "promote", "abort"],
    succeeded: ["start"],
    failed: ["start", "promote"],
    aborted: ["start", "promote"],
  };

  const $ = (id) => document.getElementById(id);
  // "route\u0000upstream" -> counters seen, oldest first: {t, requests, errors, buckets}.
  const samples = new Map();
  // route name -> {el, shape, rows: Map(upstream -> row cells), ...}.
  const cards = new Map();
  let le = [];
  let timer = null;
  let latest = 0; // sequence number of the newest refresh started
  let waitingForToken = false;

  class AuthError extends Error {}

  // ---- the admin API ------------------------------------------------------------------------

  function storedToken() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = storedToken();
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      // Also a token with characters a header cannot carry.
      throw new Error("cannot reach Turnout (" + err.message + ")");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (response.status === 401) throw new AuthError((data && data.error) || "token required");
    if (!response.ok) {
      let text = "HTTP " + response.status;
      if (data && data.error) text = data.error;
      else if (data && Array.isArray(data.errors)) text = data.errors.join("; ");
      throw new Error(text);
    }
    return data;
  }

  function routePath(route, tail) {
    return "/admin/routes/" + encodeURIComponent(route) + tail;
  }

  // ---- numbers ------------------------------------------------------------------------------

  function sum(values) {
    return values.reduce((total, value) => total + value, 0);
  }

  // Like Prometheus's histogram_quantile: linear inside the bucket; in the +Inf bucket, the
  // highest finite bound, marked as a lower bound.
  function quantile(q, counts, bounds) {
    const total = sum(counts);
    if (total <= 0) return null;
    const rank = q * total;
    let seen = 0;
    for (let i = 0; i < counts.length; i++) {
      const before = seen;
      seen += counts[i];
      if (seen >= rank) {
        if (i >= bounds.length) return { seconds: bounds[bounds.length - 1], above: true };
        const lower = i === 0 ? 0 : bounds[i - 1];
        const upper = bounds[i];
        return { seconds: lower + ((upper - lower) * (rank - before)) / counts[i], above: false };
      }
    }
    return { seconds: bounds[bounds.length - 1], above: true };
  }

  function record(stats) {
    if (typeof stats.poll_time !== "number") return;
    const t = stats.poll_time;
    const slots = le.length + 1;
    const present = new Set();
    for (const route of stats.routes) {
      for (const upstream of route.upstreams) {
        const key = route.name + "\u0000" + upstream.name;
        present.add(key);
        const buckets = upstream.buckets.length === slots ? upstream.buckets : Array(slots).fill(0);
        const sample = { t, requests: upstream.requests, errors: upstream.errors, buckets };
        let list = samples.get(key) || [];
        const last = list[list.length - 1];
        if (last && t <= last.t) continue; // no poll since the last answer
        // Counters only fall when the series was removed and made again (a reload): start over.
        if (last && sample.requests < last.requests) list = [];
        list.push(sample);
        while (list.length > 2 && list[1].t <= t - WINDOW_S) list.shift();
        samples.set(key, list);
      }
    }
    for (const key of samples.keys()) if (!present.has(key)) samples.delete(key);
  }

  // Rate, error share and p99 of one (route, upstream) over the window; null before 2 polls.
  function figures(route, upstream) {
    const list = samples.get(route + "\u0000" + upstream);
    if (!list || list.length < 2) return null;
    const first = list[0];
    const last = list[list.length - 1];
    const seconds = last.t - first.t;
    if (seconds <= 0) return null;
    const requests = last.requests - first.requests;
    const errors = last.errors - first.errors;
    const buckets = last.buckets.map((value, i) => value - first.buckets[i]);
    return {
      rps: requests / seconds,
      errorPct: requests > 0 ? (100 * errors) / requests : null,
      p99: requests > 0 ? quantile(0.99, buckets, le) : null,
    };
  }

  function formatRate(rps) {
    if (rps === 0) return "0";
    return rps < 10 ? rps.toFixed(1) : Math.round(rps).toLocaleString("en");
  }

  function formatSeconds(seconds) {
    if (seconds < 0.001) return (seconds * 1000).toFixed(2) + " ms";
    if (seconds < 1) return (seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0) + " ms";
    return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
  }

  function formatShare(share) {
    return (Number.isInteger(share) ? share.toFixed(0) : share.toFixed(1)) + " %";
  }

  // ---- building the page --------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(label, action, danger) {
    const node = el("button", danger ? "act danger" : "act", label);
    node.type = "button";
    node.dataset.action = action;
    return node;
  }

  function cssToken(text) {
    return /^[a-z]+$/.test(text) ? text : "other";
  }

  function describeMatch(match) {
    if (!match || typeof match !== "object") return "";
    const parts = [];
    if (match.host) parts.push(String(match.host));
    parts.push(match.path_prefix ? String(match.path_prefix) : "/");
    return parts.join(" ");
  }

  function versionsOf(route, statsRoute) {
    const names = Object.keys(route.effective_split || {});
    for (const upstream of statsRoute ? statsRoute.upstreams : []) {
      if (!names.includes(upstream.name)) names.push(upstream.name);
    }
    return names;
  }

  function buildCard(route, versions, withRollout) {
    const card = { el: el("section", "route"), rows: new Map(), colors: new Map() };
    card.el.dataset.route = route.name;

    const head = el("div", "route-head");
    head.append(el("h2", "", route.name));
    card.match = head.appendChild(el("span", "match"));
    card.source = head.appendChild(el("span", "badge"));
    card.source.dataset.field = "source";
    card.file = head.appendChild(el("span", "match"));
    card.el.append(head);

    card.bar = card.el.appendChild(el("div", "bar"));
    card.bar.dataset.field = "bar";

    const table = el("table", "versions");
    const headRow = table.createTHead().insertRow();
    for (const title of ["version", "split", "req/s", "errors", "p99", ""]) {
      headRow.append(el("th", title ? "" : "actions", title));
    }
    const body = table.createTBody();
    versions.forEach((name, index) => {
      const color = "c" + (index % COLORS);
      card.colors.set(name, color);
      const tr = body.insertRow();
      tr.dataset.upstream = name;
      const label = tr.insertCell();
      label.append(el("span", "swatch " + color), document.createTextNode(name));
      const cells = {};
      for (const field of ["split", "rps", "errors", "p99"]) {
        cells[field] = tr.insertCell();
        cells[field].dataset.field = field;
      }
      const actions = tr.insertCell();
      actions.className = "actions";
      cells.flip = actions.appendChild(button("send 100 %", "flip"));
      cells.flip.title = "Put a runtime split in force: all of this route's traffic to " + name;
      cells.flip.addEventListener("click", () => flip(route.name, name));
      card.rows.set(name, cells);
    });
    card.el.append(table);

    const routeActions = card.el.appendChild(el("div", "route-actions"));
    card.reset = routeActions.appendChild(button("back to the file's split", "reset"));
    card.reset.addEventListener("click", () => resetSplit(route.name));

    if (withRollout) buildRollout(card, route.name);
    return card;
  }

  function buildRollout(card, name) {
    const box = card.el.appendChild(el("div", "rollout-box"));
    box.dataset.field = "rollout";
    const head = box.appendChild(el("div", "rollout-head"));
    card.rolloutTitle = head.appendChild(el("h3"));
    card.rolloutState = head.appendChild(el("span", "badge"));
    card.rolloutState.dataset.field = "rollout-state";
    card.rolloutStep = head.appendChild(el("span", "match"));
    card.rolloutStep.dataset.field = "rollout-step";
    const buttons = head.appendChild(el("div", "buttons"));
    card.rolloutButtons = new Map();
    for (const action of ROLLOUT_ACTIONS) {
      const node = button(action, action, action === "abort");
      node.addEventListener("click", () => rollout(name, action));
      card.rolloutButtons.set(action, buttons.appendChild(node));
    }
    card.steps = box.appendChild(el("div", "steps"));
    card.reason = box.appendChild(el("p", "reason"));
    card.reason.dataset.field = "rollout-reason";
    const table = box.appendChild(el("table", "history"));
    table.dataset.field = "history";
    const headRow = table.createTHead().insertRow();
    for (const title of ["time", "step", "canary", "verdict", "why"]) {
      headRow.append(el("th", "", title));
    }
    card.history = table.createTBody();
  }

  function updateCard(card, route) {
    card.match.textContent = describeMatch(route.match);
    const source = String(route.split_source || "file");
    card.source.className = "badge " + cssToken(source);
    card.source.textContent = source === "file" ? "file split" : source + " split";
    const configured = route.configured_split || {};
    card.file.textContent =
      source === "file"
        ? ""
        : "file: " +
          Object.entries(configured)
            .map(([name, weight]) => name + " " + weight)
            .join(", ");
    card.reset.hidden = source !== "runtime" && source !== "fleet";

    const split = route.effective_split || {};
    card.bar.replaceChildren();
    for (const [name, share] of Object.entries(split)) {
      if (!(share > 0)) continue;
      // A label only where it fits.
      const label = share >= 8 ? name + " " + formatShare(share) : "";
      const segment = el("span", card.colors.get(name) || "c5", label);
      segment.style.width = share + "%";
      segment.title = name + ": " + formatShare(share);
      card.bar.append(segment);
    }

    for (const [name, cells] of card.rows) {
      const share = typeof split[name] === "number" ? split[name] : 0;
      cells.split.textContent = formatShare(share);
      cells.split.dataset.value = String(share);
      const shown = figures(route.name, name);
      cells.rps.textContent = shown ? formatRate(shown.rps) : "–";
      cells.rps.dataset.value = shown ? String(shown.rps) : "";
      if (shown && shown.errorPct !== null) {
        cells.errors.textContent = shown.errorPct.toFixed(shown.errorPct < 10 ? 2 : 1) + " %";
        cells.errors.dataset.value = String(shown.errorPct);
        cells.errors.className = shown.errorPct > 0 ? "bad" : "";
      } else {
        cells.errors.textContent = "–";
        cells.errors.dataset.value = "";
        cells.errors.className = "";
      }
      const p99 = shown && shown.p99;
      cells.p99.textContent = p99 ? (p99.above ? "> " : "") + formatSeconds(p99.seconds) : "–";
      cells.p99.dataset.value = p99 ? String(p99.seconds) : "";
      cells.flip.disabled = share >= 100;
    }
    if (card.rolloutState) updateRollout(card, route);
  }

  function updateRollout(card, route) {
    const config = route.rollout_config || {};
    const rollout = route.rollout || { state: "idle", step: 0, history: [] };
    const state = String(rollout.state || "idle");
    // baseline -> canary: the way the traffic moves.
    card.rolloutTitle.textContent =
      "Rollout" + (config.canary ? ": " + (config.baseline || "?") + " → " + config.canary : "");
    card.rolloutState.className = "badge " + cssToken(state);
    card.rolloutState.textContent = state;
    const steps = Array.isArray(config.steps) ? config.steps : [];
    const step = Number.isInteger(rollout.step) ? rollout.step : 0;
    const active = state === "running" || state === "paused";
    // Steps are counted from 0, as in the API, the logs and turnout_rollout_step.
    let where = active ? "step " + step : "";
    if (typeof rollout.canary_weight === "number" && state !== "idle") {
      where += (where ? " · " : "") + "canary at " + formatShare(rollout.canary_weight);
    }
    card.rolloutStep.textContent = where;
    const allowed = ALLOWED[state] || ROLLOUT_ACTIONS;
    for (const [action, node] of card.rolloutButtons) node.hidden = !allowed.includes(action);

    card.steps.replaceChildren();
    steps.forEach((weight, index) => {
      let mark = "";
      if (state === "succeeded" || (active && index < step)) mark = "done";
      if (active && index === step) mark = "current";
      card.steps.append(el("span", mark, weight + " %"));
    });
    card.reason.textContent = rollout.reason ? String(rollout.reason) : "";

    const all = Array.isArray(rollout.history) ? rollout.history : [];
    const history = all.slice(-HISTORY_SHOWN).reverse();
    card.history.replaceChildren();
    if (history.length === 0) {
      const cell = card.history.insertRow().insertCell();
      cell.colSpan = 5;
      cell.className = "empty";
      cell.textContent = "no verdict yet";
    }
    for (const entry of history) {
      const tr = card.history.insertRow();
      const at = new Date(entry.at);
      const known = !Number.isNaN(at.getTime());
      tr.insertCell().textContent = known ? at.toLocaleTimeString() : String(entry.at || "");
      tr.insertCell().textContent = Number.isInteger(entry.step) ? String(entry.step) : "";
      const weight = entry.weight;
      tr.insertCell().textContent = typeof weight === "number" ? formatShare(weight) : "";
      const verdict = String(entry.verdict || "");
      tr.insertCell().append(el("span", "badge " + cssToken(verdict), verdict));
      const why = tr.insertCell();
      why.textContent = String(entry.reason || "");
      why.title = why.textContent; // the cell cuts a long reason; hovering shows it whole
    }
  }

  function render(routes, stats) {
    if (Array.isArray(stats.le)) le = stats.le;
    record(stats);
    const statsByRoute = new Map(stats.routes.map((route) => [route.name, route]));
    const main = $("routes");
    const names = new Set();
    for (const route of routes.routes) {
      names.add(route.name);
      const versions = versionsOf(route, statsByRoute.get(route.name));
      const withRollout = Boolean(route.rollout_config || route.rollout);
      const shape = JSON.stringify([versions, withRollout]);
      let card = cards.get(route.name);
      if (!card || card.shape !== shape) {
        const fresh = buildCard(route, versions, withRollout);
        fresh.shape = shape;
        if (card) card.el.replaceWith(fresh.el);
        card = fresh;
        cards.set(route.name, card);
      }
      updateCard(card, route);
      main.append(card.el); // keeps the table's order (moves a node that is already there)
    }
    for (const [name, card] of cards) {
      if (!names.has(name)) {
        card.el.remove();
        cards.delete(name);
      }
    }
    if (routes.routes.length === 0) main.replaceChildren(el("p", "empty", "No routes."));
    const count = routes.routes.length;
    document.title = "Turnout · " + count + (count === 1 ? " route" : " routes");

    let status = "generation " + routes.generation;
    if (typeof stats.poll_age === "number") {
      const age = stats.poll_age;
      status += " · counters of " + new Date(Date.now() - age * 1000).toLocaleTimeString();
      if (age > 5) status += " (" + Math.round(age) + " s old: the workers are slow to answer)";
    } else {
      status += " · waiting for the workers' first counters";
    }
    setStatus(status, false);
  }

  // ---- refreshing ---------------------------------------------------------------------------

  function setStatus(text, bad) {
    const node = $("status");
    node.textContent = text;
    node.className = bad ? "status bad" : "status";
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    clearTimeout(timer);
    if (waitingForToken) return;
    if (document.hidden) {
      schedule();
      return;
    }
    const seq = ++latest;
    try {
      const [routes, stats] = await Promise.all([
        api("GET", "/admin/routes"),
        api("GET", "/admin/stats"),
      ]);
      // An action's refresh may have started after this one: show only the newest answers.
      if (seq === latest) render(routes, stats);
    } catch (err) {
      if (err instanceof AuthError) {
        askForToken(storedToken() ? "That token was refused: " + err.message : "");
        return;
      }
      setStatus(err.message + "; retrying", true);
    }
    if (seq === latest) schedule();
  }

  // ---- buttons ------------------------------------------------------------------------------

  let messageTimer = null;

  // A success fades after a while; a refusal stays until the next action.
  function showMessage(text, ok) {
    const node = $("message");
    node.textContent = text;
    node.className = ok ? "message ok" : "message";
    node.hidden = false;
    clearTimeout(messageTimer);
    if (ok) messageTimer = setTimeout(() => (node.hidden = true), 6000);
  }

  async function act(what, method, path, body, question) {
    if (question && !window.confirm(question)) return;
    try {
      await api(method, path, body);
      showMessage(what + ": done.", true);
    } catch (err) {
      if (err instanceof AuthError) {
        askForToken("That token was refused: " + err.message);
        return;
      }
      showMessage(what + ": " + err.message, false);
    }
    refresh();
  }

  function flip(route, upstream) {
    act(
      "Route " + route + ": all traffic to " + upstream,
      "PUT",
      routePath(route, "/split"),
      { [upstream]: 100 },
      "Send all of route " + route + " to " + upstream + "?\n" +
        "This is a runtime split; a running rollout of the route is paused."
    );
  }

  function resetSplit(route) {
    act(
      "Route " + route + ": back to the file's split",
      "DELETE",
      routePath(route, "/split"),
      undefined,
      "Drop the runtime split of route " + route + " (the file's split takes over)?"
    );
  }

  function rollout(route, action) {
    const questions = {
      promote: "Promote the canary of route " + route + " to 100 % now?",
      abort: "Abort the rollout of route " + route + " (canary to 0 % now)?",
    };
    const path = routePath(route, "/rollout/" + action);
    act("Rollout of " + route + ": " + action, "POST", path, undefined, questions[action]);
  }

  // ---- the token ----------------------------------------------------------------------------

  function askForToken(problem) {
    sessionStorage.removeItem(TOKEN_KEY);
    waitingForToken = true;
    $("forget-token").hidden = true;
    $("token-form").hidden = false;
    const error = $("token-error");
    error.textContent = problem;
    error.hidden = !problem;
    setStatus("admin token needed", true);
    $("token").focus();
  }

  function start() {
    $("window").textContent = String(WINDOW_S);
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      $("token-form").hidden = true;
      $("forget-token").hidden = false;
      waitingForToken = false;
      refresh();
    });
    $("forget-token").addEventListener("click", () => {
      askForToken("");
      for (const card of cards.values()) card.el.remove();
      cards.clear();
      samples.clear();
    });
    $("forget-token").hidden = !storedToken();
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });
    refresh();
  }

  start();
})();
