// flask-durable dashboard: live updates of a run page, and confirmations.
// Plain JavaScript, no dependencies. The pages work without it (reload to
// see progress); with it, a run page refreshes its live part every second
// until the run is finished.
(function () {
  "use strict";

  var POLL_MS = 1000;
  var MAX_BACKOFF_MS = 15000;

  // Ask before destructive actions (forms with data-confirm), and do not
  // post a form twice.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      return;
    }
    if (form.dataset.sent) {
      event.preventDefault();
      return;
    }
    form.dataset.sent = "1";
  });
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) return;
    document.querySelectorAll("form[data-sent]").forEach(function (form) {
      delete form.dataset.sent;
    });
  });

  // What the reader changed in the live part, to keep it across a refresh:
  // which <details> are open, the values of form fields, the focus.
  function saveState(box) {
    var state = { open: {}, values: {}, focus: null };
    box.querySelectorAll("details[data-key]").forEach(function (el) {
      state.open[el.getAttribute("data-key")] = el.open;
    });
    box.querySelectorAll("select[name], input[name], textarea[name]").forEach(
      function (el) {
        if (el.type === "hidden") return;
        var key = fieldKey(el);
        state.values[key] = el.value;
        if (el === document.activeElement) state.focus = key;
      }
    );
    return state;
  }

  function fieldKey(el) {
    return (el.form ? el.form.getAttribute("action") : "") + "|" + el.name;
  }

  function restoreState(box, state) {
    box.querySelectorAll("details[data-key]").forEach(function (el) {
      var key = el.getAttribute("data-key");
      if (Object.prototype.hasOwnProperty.call(state.open, key)) {
        el.open = state.open[key];
      }
    });
    box.querySelectorAll("select[name], input[name], textarea[name]").forEach(
      function (el) {
        if (el.type === "hidden") return;
        var key = fieldKey(el);
        if (!Object.prototype.hasOwnProperty.call(state.values, key)) return;
        if (el.tagName === "SELECT") {
          var wanted = state.values[key];
          for (var i = 0; i < el.options.length; i++) {
            if (el.options[i].value === wanted) {
              el.value = wanted;
              break;
            }
          }
        } else {
          el.value = state.values[key];
        }
        if (state.focus === key) el.focus();
      }
    );
  }

  function startLive(box) {
    var url = box.getAttribute("data-live-url");
    var problem = document.getElementById("live-problem");
    var last = null;
    var failures = 0;

    function say(text) {
      if (!problem) return;
      problem.textContent = text;
      problem.hidden = !text;
    }

    function schedule(ms) {
      window.setTimeout(tick, ms);
    }

    function tick() {
      if (document.hidden) {
        schedule(POLL_MS);
        return;
      }
      window
        .fetch(url, {
          credentials: "same-origin",
          cache: "no-store",
          headers: { Accept: "text/html" },
        })
        .then(function (response) {
          if (response.status === 404) {
            say("This run no longer exists (it may have been pruned).");
            return null;
          }
          if (response.status === 403) {
            say("Live updates stopped: access refused. Reload the page.");
            return null;
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text().then(function (html) {
            failures = 0;
            say("");
            if (html !== last) {
              last = html;
              var state = saveState(box);
              box.innerHTML = html;
              restoreState(box, state);
              var head = box.querySelector("[data-title]");
              if (head) document.title = head.getAttribute("data-title");
            }
            var marker = box.querySelector("[data-terminal]");
            var done = marker && marker.getAttribute("data-terminal") === "true";
            box.setAttribute("data-terminal", done ? "true" : "false");
            if (!done) schedule(POLL_MS);
          });
        })
        .catch(function () {
          failures += 1;
          say("Live updates interrupted; retrying…");
          schedule(Math.min(POLL_MS * Math.pow(2, failures), MAX_BACKOFF_MS));
        });
    }

    schedule(POLL_MS);
  }

  function init() {
    var box = document.getElementById("run");
    if (box && box.getAttribute("data-terminal") !== "true") startLive(box);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
