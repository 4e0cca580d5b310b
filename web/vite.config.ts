// Vite build configuration: bundles index.html + src/ into dist/, which the Rust server serves at `/`.
import { defineConfig } from 'vite';

export default defineConfig({
  base: './',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: true,
    chunkSizeWarningLimit: 2000,
  },
  server: {
    // `npm exec vite` during development: forward the sync and exec endpoints to a locally running server.
    proxy: {
      '/sync': { target: 'ws://127.0.0.1:8080', ws: true },
      '/exec': { target: 'ws://127.0.0.1:8080', ws: true },
    },
  },
});
