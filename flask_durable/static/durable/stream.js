/* flask-durable: read a durable run's stream in the browser.
 *
 *   <script src="/durable/stream.js"></script>
 *   DurableStream.start("/ask", {method: "POST", body: form}, {
 *     chunk(step, data) { ... },   // an item a streaming step produced
 *     reset(step) { ... },         // drop what that step streamed: a retry comes
 *     step(step, status) { ... },  // "running" or "completed"
 *     result(result) { ... },      // the final response: {status, headers, body}
 *   });
 *
 * start() sends the request asking for "text/event-stream": the endpoint
 * stores the run and answers with its stream and, in Location, its wait
 * URL; start() then reads the stream with EventSource, which reconnects by
 * itself and resumes after the last event it saw (Last-Event-ID). connect(streamUrl, handlers) reads a stream URL
 * directly. Both return an object with close().
 */
(function (global) {
  "use strict";

  function parse(event) {
    try { return JSON.parse(event.data); } catch (e) { return null; }
  }

  function connect(url, handlers) {
    handlers = handlers || {};
    var source = new EventSource(url);
    var done = false;
    source.addEventListener("chunk", function (e) {
      var d = parse(e); if (d && handlers.chunk) handlers.chunk(d.step, d.data);
    });
    source.addEventListener("reset", function (e) {
      var d = parse(e); if (d && handlers.reset) handlers.reset(d.step);
    });
    source.addEventListener("step", function (e) {
      var d = parse(e); if (d && handlers.step) handlers.step(d.step, d.status);
    });
    source.addEventListener("result", function (e) {
      done = true;
      source.close();
      var d = parse(e); if (d && handlers.result) handlers.result(d);
    });
    source.addEventListener("error", function () {
      if (!done && handlers.reconnecting) handlers.reconnecting();
    });
    return { close: function () { done = true; source.close(); }, source: source };
  }

  function streamUrl(location) {
    return location.replace("/wait/", "/stream/");
  }

  function start(url, init, handlers) {
    init = init || {};
    var headers = new Headers(init.headers || {});
    headers.set("Accept", "text/event-stream");
    headers.set("Prefer", "respond-async");
    var abort = new AbortController();
    var request = Object.assign({}, init, {
      headers: headers, redirect: "manual", signal: abort.signal });
    var handle = { closed: false, inner: null,
      close: function () { this.closed = true; if (this.inner) this.inner.close(); } };
    fetch(url, request).then(function (response) {
      var location = response.headers.get("Location");
      var type = response.headers.get("Content-Type") || "";
      if (location && (response.status === 202 || type.indexOf("text/event-stream") === 0)) {
        // The run is stored: read its stream with EventSource, which
        // reconnects by itself, from the first event.
        abort.abort();
        if (!handle.closed) handle.inner = connect(streamUrl(location), handlers);
        return null;
      }
      // Finished at once (or refused): the answer is the result.
      return response.text().then(function (body) {
        var pairs = [];
        response.headers.forEach(function (v, k) { pairs.push([k, v]); });
        if (handlers.result) handlers.result({ status: response.status, headers: pairs, body: body });
      });
    }).catch(function (error) {
      if (handlers.error) handlers.error(error);
    });
    return handle;
  }

  global.DurableStream = { connect: connect, start: start, streamUrl: streamUrl };
})(window);
