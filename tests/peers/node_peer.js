'use strict';
// A WebSocket peer on the node `ws` package (major 8), for tests/ws_peers.rs.
//
//   node tests/peers/node_peer.js <persona> [port]
//
// Binds 127.0.0.1 (port 0, an ephemeral port, unless one is given: the tests restart a killed
// peer on the same port) and prints `PORT <n>` on stdout first thing. Nothing else goes to
// stdout; diagnostics go to stderr only with PEER_DEBUG=1.
//
// Personas:
//   echo            echoes every text and binary message; a text `<seq>:<payload>` is answered
//                   with `ack:<seq>` instead (at-least-once acknowledgements)
//   slow-handshake  accepts TCP, answers the upgrade only after PEER_HANDSHAKE_DELAY_MS
//                   (default 2000 ms), then echoes
//   reject-503      answers the upgrade with HTTP 503
//   drop            accepts the upgrade, then destroys the socket without a Close frame after
//                   the first message or after PEER_DROP_AFTER_MS (default 300 ms)
//   stop-reading    accepts the upgrade, then never reads again: a Close is never answered
//
// `ws` is found with NODE_PATH, or in the repository's .peers/node_modules.

const http = require('http');
const path = require('path');

function loadWs() {
  try {
    return require('ws');
  } catch (error) {
    return require(path.resolve(__dirname, '..', '..', '.peers', 'node_modules', 'ws'));
  }
}

const { WebSocketServer } = loadWs();

const PERSONAS = ['echo', 'slow-handshake', 'reject-503', 'drop', 'stop-reading'];
const persona = process.argv[2];
const port = Number(process.argv[3] || 0);
const HANDSHAKE_DELAY_MS = Number(process.env.PEER_HANDSHAKE_DELAY_MS || 2000);
const DROP_AFTER_MS = Number(process.env.PEER_DROP_AFTER_MS || 300);
const DEBUG = process.env.PEER_DEBUG === '1';

function debug(...args) {
  if (DEBUG) console.error(`[node_peer ${persona}]`, ...args);
}

if (!PERSONAS.includes(persona)) {
  console.error(`usage: node node_peer.js <${PERSONAS.join('|')}> [port]`);
  process.exit(2);
}

const server = http.createServer((req, res) => {
  res.writeHead(426, { 'Content-Type': 'text/plain' });
  res.end('websocket only\n');
});
const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  socket.on('error', (error) => debug('socket error', error.message));
  switch (persona) {
    case 'reject-503':
      debug('rejecting with 503');
      socket.end(
        'HTTP/1.1 503 Service Unavailable\r\n' +
          'Content-Type: text/plain\r\n' +
          'Content-Length: 5\r\n' +
          'Connection: close\r\n\r\n' +
          'busy\n',
      );
      return;
    case 'slow-handshake':
      debug(`delaying the upgrade by ${HANDSHAKE_DELAY_MS} ms`);
      setTimeout(() => {
        if (!socket.destroyed) upgrade(req, socket, head);
      }, HANDSHAKE_DELAY_MS);
      return;
    default:
      upgrade(req, socket, head);
  }
});

function upgrade(req, socket, head) {
  wss.handleUpgrade(req, socket, head, (ws) => opened(ws, socket));
}

function opened(ws, socket) {
  debug('open');
  ws.on('error', (error) => debug('ws error', error.message));
  switch (persona) {
    case 'echo':
    case 'slow-handshake':
      ws.on('message', (data, isBinary) => {
        if (!isBinary) {
          const match = /^(\d+):/.exec(data.toString());
          if (match) {
            ws.send(`ack:${match[1]}`);
            return;
          }
        }
        ws.send(data, { binary: isBinary });
      });
      break;
    case 'drop': {
      const drop = () => {
        clearTimeout(timer);
        debug('dropping the socket without a Close');
        // terminate() destroys the socket at once: no Close frame.
        ws.terminate();
      };
      const timer = setTimeout(drop, DROP_AFTER_MS);
      ws.once('message', drop);
      break;
    }
    case 'stop-reading':
      debug('never reading again');
      // ws reads in 'data' events; a paused socket delivers none, so the client's Close stays
      // unread in the kernel's buffer and is never answered.
      socket.pause();
      break;
    default:
      break;
  }
}

server.on('error', (error) => {
  console.error(`node_peer: ${error.message}`);
  process.exit(1);
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`PORT ${server.address().port}\n`);
});
