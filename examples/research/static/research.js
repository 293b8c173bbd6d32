"use strict";
(function () {
  var form = document.getElementById("ask");
  var stepsBox = document.getElementById("steps");
  var statusLine = document.getElementById("status");
  var resultBox = document.getElementById("result");

  function box(step) {
    var id = "step-" + step;
    var el = document.getElementById(id);
    if (!el) {
      el = document.createElement("section");
      el.id = id;
      el.className = "step";
      var title = document.createElement("h2");
      title.textContent = step;
      var text = document.createElement("p");
      text.className = "text";
      el.appendChild(title);
      el.appendChild(text);
      stepsBox.appendChild(el);
    }
    return el;
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    stepsBox.textContent = "";
    resultBox.textContent = "";
    statusLine.textContent = "asking…";
    DurableStream.start("/ask", { method: "POST", body: new FormData(form) }, {
      chunk: function (step, data) {
        box(step).querySelector(".text").textContent += data;
      },
      reset: function (step) {
        var el = box(step);
        el.querySelector(".text").textContent = "";
        var note = document.createElement("p");
        note.className = "note";
        note.textContent = "this step failed; retrying…";
        el.appendChild(note);
      },
      step: function (step, status) {
        box(step).className = "step " + status;
      },
      result: function (result) {
        statusLine.textContent = "done (" + result.status + ")";
        resultBox.textContent = result.body;
      },
      reconnecting: function () {
        statusLine.textContent = "reconnecting…";
      },
    });
  });
})();
