// The hospital's live feed, shared by every page that updates itself: connect to /ws/events/,
// subscribe, show the state in #live, reconnect with backoff, stop for good when access ends.
// The socket only says "something changed"; each page fetches what it shows, and `onSubscribed`
// runs after every (re)connection so a page that was offline catches up: the database is the truth.
window.SightlineFeed = function (tenant, handlers) {
  "use strict";
  var indicator = document.getElementById("live");
  // close codes that mean "signed out" or "access revoked" (CLOSE_UNAUTHENTICATED and
  // CLOSE_ACCESS_REVOKED in recognition/consumers.py): reconnecting would not help
  var CLOSE_UNAUTHENTICATED = 4401, CLOSE_ACCESS_REVOKED = 4403;
  var FIRST_RETRY_MS = 500, MAX_RETRY_MS = 15000;  // backoff doubles from the first to the most
  var delay = FIRST_RETRY_MS;

  function setState(state, text) {
    if (!indicator) return;
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + "/ws/events/");
    socket.onopen = function () {
      delay = FIRST_RETRY_MS;
      socket.send(JSON.stringify({type: "subscribe", tenant: tenant}));
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "subscribed") {
        setState("live", "live");
        if (handlers.onSubscribed) handlers.onSubscribed();
      } else if (handlers[message.type]) {
        handlers[message.type](message);
      }
    };
    socket.onclose = function (event) {
      if (event.code === CLOSE_UNAUTHENTICATED || event.code === CLOSE_ACCESS_REVOKED) {
        setState("offline", "signed out — reload the page");
        return;
      }
      setState("offline", "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, MAX_RETRY_MS);
    };
  }

  connect();
};
